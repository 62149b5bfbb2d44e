"""Tests of covpool.functional: covariance, triu vectorisation, pooling, group whitening, all-reduce."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from covpool.functional import (
    all_reduce_sum,
    covariance,
    group_statistics,
    group_whiten,
    is_distributed,
    moments_from_statistics,
    sqrt_covariance_pool,
    triu_vectorize,
    whitening_matrix,
)
from covpool.testing import reference_root


def _correlated(*shape: int, dtype=torch.float64, device="cpu", shift: float = 0.0) -> torch.Tensor:
    """Samples ``(*, M, d)`` with correlated columns and a nonzero mean."""
    d = shape[-1]
    mixing = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64) @ mixing + shift + torch.randn(d, dtype=torch.float64)
    return x.to(dtype=dtype, device=device)


class TestCovariance:
    @pytest.mark.parametrize("shape", [(7, 3), (2, 40, 5), (2, 3, 9, 4)])
    def test_matches_torch_cov(self, shape, device):
        x = _correlated(*shape, device=device)
        expected = torch.stack([torch.cov(s.T, correction=0) for s in x.reshape(-1, *shape[-2:])])
        assert torch.allclose(covariance(x).reshape(-1, shape[-1], shape[-1]), expected, atol=1e-12)

    def test_float32_with_large_mean(self, device):
        x = _correlated(500, 6, shift=1e3, device=device)
        out = covariance(x.float())
        assert out.dtype == torch.float32
        expected = covariance(x)
        assert (out.double() - expected).abs().max() < 1e-3 * expected.abs().max()

    def test_autocast_runs_in_float32(self, device):
        x = _correlated(2, 30, 4, dtype=torch.float32, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = covariance(x)
        assert out.dtype == torch.float32
        assert torch.allclose(out, covariance(x), atol=1e-6)

    def test_gradcheck(self, device):
        x = _correlated(2, 6, 3, device=device).requires_grad_()
        assert gradcheck(covariance, (x,))

    def test_rejects_vector(self):
        with pytest.raises(ValueError, match="x must have shape"):
            covariance(torch.randn(5))


class TestTriuVectorize:
    def test_order_and_scale(self, device):
        A = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]], device=device)
        r = math.sqrt(2.0)
        expected = torch.tensor([1.0, 2 * r, 3 * r, 4.0, 5 * r, 6.0], device=device)
        assert torch.allclose(triu_vectorize(A), expected)
        assert torch.equal(triu_vectorize(A, off_diagonal_scale=1.0), torch.arange(1.0, 7.0, device=device))

    def test_isometry(self, device):
        A = torch.randn(3, 5, 5, dtype=torch.float64, device=device)
        A, B = A + A.mT, (A @ A.mT)
        assert torch.allclose(triu_vectorize(A).norm(dim=-1), torch.linalg.matrix_norm(A))
        inner = (triu_vectorize(A) * triu_vectorize(B)).sum(-1)
        assert torch.allclose(inner, (A * B).sum((-2, -1)))

    def test_rejects_non_square(self):
        with pytest.raises(ValueError, match="A must have shape"):
            triu_vectorize(torch.randn(3, 4))


class TestSqrtCovariancePool:
    def test_reference(self, device):
        x = _correlated(3, 40, 5, device=device)
        expected = triu_vectorize(reference_root(covariance(x)))
        assert torch.allclose(sqrt_covariance_pool(x, eps=0.0, root="eigh"), expected, atol=1e-10)

    def test_rank_deficient_has_finite_gradient(self, device):
        x = _correlated(2, 4, 16, device=device).requires_grad_()  # 4 positions < 16 channels
        out = sqrt_covariance_pool(x, eps=1e-4)
        out.square().sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()

    def test_gradcheck(self, device):
        # eps=0: the core's relative ridge eps·λmax(A) is treated as a constant in its backward.
        x = _correlated(2, 8, 3, device=device).requires_grad_()
        assert gradcheck(lambda t: sqrt_covariance_pool(t, eps=0.0, root="eigh"), (x,))

    def test_rejects_a_single_position(self):
        with pytest.raises(ValueError, match=r"at least 2 positions .*got shape \(3, 1, 5\)"):
            sqrt_covariance_pool(torch.randn(3, 1, 5))

    def test_autocast_bfloat16(self, device):
        x = _correlated(2, 49, 8, dtype=torch.float32, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = sqrt_covariance_pool(x.bfloat16())
        assert out.dtype == torch.bfloat16
        expected = sqrt_covariance_pool(x.bfloat16().float())  # same inputs, float32 throughout
        assert torch.allclose(out.float(), expected, rtol=1e-2, atol=1e-2)


class TestWhitening:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_moments_match_torch_cov(self, dtype, device):
        x = _correlated(300, 8, shift=50.0, dtype=dtype, device=device)
        count, sums, second = group_statistics(x, group_size=4)
        assert count.dtype == sums.dtype == second.dtype == torch.float64
        mean, cov = moments_from_statistics(count, sums, second)
        x64 = x.double()
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert torch.allclose(mean.reshape(-1), x64.mean(0), atol=tol * 50)
        for g in range(2):
            block = torch.cov(x64[:, 4 * g : 4 * g + 4].T, correction=0)
            assert torch.allclose(cov[g], block, atol=tol)

    def test_summed_statistics_equal_union(self, device):
        x = _correlated(23, 6, device=device)
        parts = [group_statistics(p, group_size=3) for p in (x[:5], x[5:6], x[6:])]
        summed = [sum(items) for items in zip(*parts, strict=True)]
        for got, expected in zip(
            moments_from_statistics(*summed),
            moments_from_statistics(*group_statistics(x, group_size=3)),
            strict=True,
        ):
            assert torch.allclose(got, expected, atol=1e-12)

    def test_empty_rows_contribute_zero(self):
        count, sums, second = group_statistics(torch.empty(0, 4), group_size=2)
        assert count.item() == 0 and not sums.any() and not second.any()

    def test_whitened_covariance_is_identity(self, device):
        x = _correlated(200, 6, device=device)
        mean, cov = moments_from_statistics(*group_statistics(x, group_size=3))
        out = group_whiten(x, mean, whitening_matrix(cov, root="eigh", eps=0.0))
        for g in range(2):
            block = covariance(out[:, 3 * g : 3 * g + 3])
            assert torch.allclose(block, torch.eye(3, dtype=torch.float64, device=device), atol=1e-10)

    def test_whitening_matrix_absolute_eps(self, device):
        cov = torch.diag(torch.tensor([4.0, 1e-3], dtype=torch.float64, device=device))
        expected = torch.diag((cov.diagonal() + 0.5).rsqrt())
        assert torch.allclose(whitening_matrix(cov, root="eigh", eps=0.5), expected)

    def test_gradcheck(self, device):
        x = _correlated(12, 4, device=device).requires_grad_()

        def whiten(t):
            mean, cov = moments_from_statistics(*group_statistics(t, group_size=2))
            return group_whiten(t, mean, whitening_matrix(cov, root="eigh", eps=1e-3))

        assert gradcheck(whiten, (x,))

    def test_rejects_indivisible_channels(self):
        with pytest.raises(ValueError, match="divisible by group_size=4"):
            group_statistics(torch.randn(10, 6), group_size=4)


class TestAllReduceOutsideDistributed:
    def test_identity(self):
        assert not is_distributed()
        tensors = (torch.tensor(2.0), torch.randn(3))
        out = all_reduce_sum(*tensors)
        assert all(o is t for o, t in zip(out, tensors, strict=True))
