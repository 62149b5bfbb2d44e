"""covpool.sqrtm / covpool.inv_sqrtm: accuracy, gradients, dtypes, modes, bad input."""

from __future__ import annotations

import pytest
import torch

import covpool
from covpool.linalg.auto import choose_method
from covpool.testing import random_covariance, random_spd, reference_gradient, reference_root, relative_error

ROOTS = {"sqrtm": (covpool.sqrtm, False), "inv_sqrtm": (covpool.inv_sqrtm, True)}
FAST_METHODS = ["mpa", "mtp", "eigh", "auto"]


def forward_and_gradient(fn, A, upstream, **kwargs):
    A = A.clone().requires_grad_(True)
    out = fn(A, **kwargs)
    (grad,) = torch.autograd.grad(out, A, upstream)
    return out.detach(), grad


class TestAccuracy:
    """The issue's accuracy table: float32, default settings, condition numbers up to 1e3."""

    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", FAST_METHODS)
    @pytest.mark.parametrize("n", [16, 32, 64, 128, 256])
    @pytest.mark.parametrize("condition", [10.0, 1e3])
    def test_forward_and_gradient_within_1e3(self, name, method, n, condition, device):
        fn, inverse = ROOTS[name]
        A64 = random_spd(2, n=n, condition=condition)
        upstream = torch.randn(2, n, n, dtype=torch.float64)
        out, grad = forward_and_gradient(
            fn, A64.float().to(device), upstream.float().to(device), method=method
        )
        assert out.dtype == torch.float32
        assert relative_error(out.cpu(), reference_root(A64, inverse=inverse)).max() <= 1e-3
        exact = reference_gradient(A64, upstream, inverse=inverse)
        assert relative_error(grad.cpu(), exact).max() <= 1e-3

    @pytest.mark.parametrize("name", ROOTS)
    def test_paper_configuration_is_reachable_and_loses_accuracy_when_ill_conditioned(self, name):
        fn, inverse = ROOTS[name]
        A64 = random_spd(2, n=64, condition=1e3)
        upstream = torch.randn(2, 64, 64, dtype=torch.float64)
        out, grad = forward_and_gradient(fn, A64, upstream, **covpool.PAPER_CONFIG)
        forward_error = relative_error(out, reference_root(A64, inverse=inverse)).max()
        gradient_error = relative_error(grad, reference_gradient(A64, upstream, inverse=inverse)).max()
        assert forward_error > 1e-2 and gradient_error > 1e-2
        default_out = fn(A64, method="mpa")
        assert relative_error(default_out, reference_root(A64, inverse=inverse)).max() < forward_error / 100

    @pytest.mark.parametrize("name", ROOTS)
    def test_power_normalisation_beats_frobenius(self, name):
        fn, inverse = ROOTS[name]
        A = random_spd(4, n=256, condition=1e3)
        exact = reference_root(A, inverse=inverse)
        errors = {
            norm: relative_error(fn(A, method="mpa", steps=3, normalization=norm), exact).max()
            for norm in ("power", "frobenius")
        }
        assert errors["power"] < errors["frobenius"] / 10

    @pytest.mark.parametrize("name", ROOTS)
    def test_more_steps_reach_float64_precision(self, name):
        fn, inverse = ROOTS[name]
        A = random_spd(3, n=32, condition=1e4)
        assert relative_error(fn(A, method="mpa", steps=6), reference_root(A, inverse=inverse)).max() < 1e-10

    @pytest.mark.parametrize("name", ROOTS)
    def test_newton_schulz_matches_isqrt_cov_recurrence(self, name):
        fn, inverse = ROOTS[name]
        A = random_spd(2, n=8, condition=10)
        trace = A.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        Y, Z, eye = A / trace, torch.eye(8, dtype=A.dtype).expand_as(A), torch.eye(8, dtype=A.dtype)
        for _ in range(3):
            T = 0.5 * (3 * eye - Z @ Y)
            Y, Z = Y @ T, T @ Z
        expected = Z / trace.sqrt() if inverse else Y * trace.sqrt()
        torch.testing.assert_close(fn(A, method="ns", steps=3), expected)


class TestGradients:
    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"method": "mpa"},
            {"method": "mpa", "backward_newton": False},
            {
                "method": "mpa",
                "degree": 5,
                "steps": 1,
                "normalization": "frobenius",
                "backward_tol": None,
                "backward_iters": 30,
            },
            {"method": "mtp"},
            {"method": "ns", "steps": 12},
            {"method": "eigh"},
        ],
        ids=["mpa", "mpa-plain-backward", "mpa-direct", "mtp", "ns", "eigh"],
    )
    def test_gradcheck_float64(self, name, kwargs):
        fn, _ = ROOTS[name]
        A = random_spd(2, n=5, condition=4.0).requires_grad_(True)
        if kwargs.get("steps") == 1:
            A = (A + 3 * torch.eye(5, dtype=A.dtype)).detach().requires_grad_(True)
            kwargs = {**kwargs, "degree": 12}
        assert torch.autograd.gradcheck(lambda a: fn(a, **kwargs), (A,), atol=1e-6, rtol=1e-5)

    @pytest.mark.parametrize("name", ROOTS)
    def test_eigh_gradient_is_exact_at_repeated_eigenvalues(self, name):
        fn, inverse = ROOTS[name]
        A = torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.5], dtype=torch.float64))
        upstream = torch.randn(4, 4, dtype=torch.float64)
        _, grad = forward_and_gradient(fn, A, upstream, method="eigh")
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, reference_gradient(A, upstream, inverse=inverse))

    @pytest.mark.parametrize("method", ["mpa", "mtp", "eigh"])
    def test_double_backward_is_refused_not_silently_wrong(self, method):
        A = random_spd(2, n=4, condition=10).requires_grad_(True)
        (grad,) = torch.autograd.grad(covpool.sqrtm(A, method=method).square().sum(), A, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            grad.sum().backward()

    def test_gradient_is_symmetric(self):
        A = random_spd(3, n=16, condition=100)
        _, grad = forward_and_gradient(
            covpool.sqrtm, A, torch.randn(3, 16, 16, dtype=torch.float64), method="mpa"
        )
        torch.testing.assert_close(grad, grad.mT)

    def test_backward_memory_does_not_grow_with_iterations(self):
        A = random_spd(2, n=16, condition=100).requires_grad_(True)

        def saved_bytes(**kwargs) -> int:
            sizes = []

            def pack(t):
                sizes.append(t.numel() * t.element_size())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                covpool.sqrtm(A, method="mpa", **kwargs)
            return sum(sizes)

        assert saved_bytes(steps=2) == saved_bytes(steps=8) > 0
        assert saved_bytes(steps=2, backward_iters=5) == saved_bytes(steps=2, backward_iters=40)

    def test_early_stop_and_fixed_iterations_agree(self):
        A = random_spd(2, n=32, condition=1e3)
        upstream = torch.randn(2, 32, 32, dtype=torch.float64)
        _, early = forward_and_gradient(covpool.sqrtm, A, upstream, method="mpa", backward_tol=1e-12)
        _, fixed = forward_and_gradient(
            covpool.sqrtm, A, upstream, method="mpa", backward_tol=None, backward_iters=30
        )
        torch.testing.assert_close(early, fixed)


class TestShapesAndDtypes:
    @pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_any_leading_batch_dimensions(self, batch_shape, method):
        A = random_spd(*batch_shape, n=6, condition=10)
        out = covpool.sqrtm(A, method=method, steps=8 if method == "ns" else None)
        assert out.shape == A.shape
        torch.testing.assert_close(out @ out, A, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("method", ["mpa", "mtp", "eigh"])
    def test_one_by_one(self, method):
        assert covpool.inv_sqrtm(torch.tensor([[4.0]]), method=method).item() == pytest.approx(0.5, rel=1e-5)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("name", ROOTS)
    def test_half_precision_is_computed_in_float32(self, dtype, name):
        fn, inverse = ROOTS[name]
        A64 = random_spd(2, n=16, condition=10)
        A = A64.to(dtype).requires_grad_(True)
        out = fn(A, method="mpa")
        out.sum().backward()
        assert out.dtype == dtype and A.grad.dtype == dtype
        reference = reference_root(A.detach().double(), inverse=inverse)
        assert relative_error(out.double(), reference).max() < 4 * torch.finfo(dtype).eps

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_cpu_bfloat16_autocast(self, method):
        x = torch.randn(4, 64, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cov = x.mT @ x / 64 + 0.1 * torch.eye(16, dtype=torch.bfloat16)
            assert cov.dtype == torch.bfloat16
            out = covpool.sqrtm(cov, method=method, steps=10 if method == "ns" else None)
        assert out.dtype == torch.bfloat16
        reference = reference_root(cov.detach().double())
        assert relative_error(out.double(), reference).max() < 0.02

    def test_non_symmetric_input_uses_its_symmetric_part(self):
        A = random_spd(2, n=8, condition=10)
        skew = torch.randn(2, 8, 8, dtype=torch.float64)
        for method in ["mpa", "eigh"]:
            torch.testing.assert_close(
                covpool.sqrtm(A + skew - skew.mT, method=method), covpool.sqrtm(A, method=method)
            )

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_deterministic(self, method):
        A = random_spd(4, n=32, condition=100, dtype=torch.float32).requires_grad_(True)
        runs = []
        for _ in range(2):
            out = covpool.inv_sqrtm(A, method=method)
            (grad,) = torch.autograd.grad(out.square().sum(), A)
            runs.append((out, grad))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])

    def test_large_spd_batch_that_broke_batched_lu(self):
        # Batched LU (torch.linalg.solve) has failed with "Pivots given to lu_solve must all be greater or
        # equal to 1" on 32x256x256 SPD batches with 2 threads; the Padé denominator is solved by Cholesky.
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            A64 = random_spd(32, n=256, condition=1e3)
            out = covpool.inv_sqrtm(A64.float(), method="mpa")
        finally:
            torch.set_num_threads(threads)
        assert relative_error(out, reference_root(A64, inverse=True)).max() < 1e-3

    @pytest.mark.skipif(
        torch.torch_version.TorchVersion(torch.__version__) < "2.12",
        reason="dynamo before torch 2.12 cannot pass the series' Fraction exponent to a constant function",
    )
    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_torch_compile_captures_one_graph(self, method):
        A = random_spd(2, n=8, condition=10, dtype=torch.float32).requires_grad_(True)

        def root(a):
            return covpool.inv_sqrtm(a, method=method, check_input=False, backward_tol=None)

        compiled = torch.compile(root, backend="eager", fullgraph=True)
        out = compiled(A)
        (grad,) = torch.autograd.grad(out.sum(), A)
        (expected_grad,) = torch.autograd.grad(root(A).sum(), A)
        torch.testing.assert_close(out, root(A))
        torch.testing.assert_close(grad, expected_grad)

    @pytest.mark.slow
    def test_torch_compile_inductor(self):
        A = random_spd(2, n=8, condition=10, dtype=torch.float32).requires_grad_(True)
        compiled = torch.compile(
            lambda a: covpool.sqrtm(a, method="mtp", check_input=False, backward_tol=None)
        )
        out = compiled(A)
        out.sum().backward()
        torch.testing.assert_close(out, covpool.sqrtm(A, method="mtp"), rtol=1e-5, atol=1e-6)
        assert torch.isfinite(A.grad).all()


class TestDegenerateInput:
    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    @pytest.mark.parametrize("case", ["rank-deficient", "zero", "tiny", "huge"])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_outputs_and_gradients_are_finite(self, name, method, case, dtype):
        fn, inverse = ROOTS[name]
        if dtype == torch.float32 and inverse and case == "tiny":
            pytest.skip("∂A^(-1/2)/∂A scales as |A|^(-3/2): 1e45 for |A| = 1e-30 is beyond float32")
        A = (
            {
                "rank-deficient": random_covariance(2, n=16, samples=4),
                "zero": torch.zeros(2, 16, 16, dtype=torch.float64),
                "tiny": 1e-30 * random_spd(2, n=16, condition=10),
                "huge": 1e30 * random_spd(2, n=16, condition=10),
            }[case]
            .to(dtype)
            .requires_grad_(True)
        )
        out = fn(A, method=method)
        (grad,) = torch.autograd.grad(out, A, torch.ones_like(out))
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()

    @pytest.mark.parametrize("method", ["mpa", "mtp", "eigh"])
    @pytest.mark.parametrize("scale", [1e-30, 1e30])
    def test_float32_square_root_is_scale_equivariant(self, method, scale):
        A = random_spd(2, n=16, condition=10, dtype=torch.float32)
        out = covpool.sqrtm(scale * A, method=method)
        torch.testing.assert_close(out / scale**0.5, covpool.sqrtm(A, method=method), rtol=1e-4, atol=1e-6)

    @pytest.mark.parametrize("method", ["mpa", "mtp", "eigh"])
    def test_eps_regularises_rank_deficient_covariance(self, method):
        A = random_covariance(2, n=16, samples=4)
        mean_eigenvalue = A.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
        expected = reference_root(A + 1e-2 * mean_eigenvalue * torch.eye(16, dtype=A.dtype), inverse=True)
        out = covpool.inv_sqrtm(A, method=method, eps=1e-2)
        assert relative_error(out, expected).max() < 1e-4

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_gradient_includes_the_ridge(self, method):
        A = random_covariance(2, n=5, samples=3).requires_grad_(True)
        steps = 14 if method == "ns" else None
        assert torch.autograd.gradcheck(
            lambda a: covpool.sqrtm(a, method=method, eps=0.1, steps=steps), (A,), atol=1e-6, rtol=1e-5
        )


class TestBadInput:
    @pytest.mark.parametrize(
        ("A", "error", "match"),
        [
            (torch.ones(3), ValueError, r"A must have shape \(\*, n, n\).*got shape \(3,\)"),
            (torch.ones(2, 3, 4), ValueError, r"square.*\(2, 3, 4\)"),
            (torch.ones(3, 3, dtype=torch.int64), TypeError, "real floating dtype.*torch.int64"),
            (torch.ones(3, 3, dtype=torch.complex64), TypeError, "complex64"),
            (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN or Inf"),
            (torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), ValueError, "NaN or Inf"),
            ([[1.0]], TypeError, "torch.Tensor.*list"),
        ],
    )
    def test_input_errors_name_argument_and_expectation(self, A, error, match):
        with pytest.raises(error, match=match):
            covpool.sqrtm(A)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"method": "svd"}, "method must be one of"),
            ({"method": "mpa", "degree": 0}, "degree must be an integer >= 1, got 0"),
            ({"method": "mtp", "steps": 2.5}, "steps must be an integer"),
            ({"normalization": "spectral", "method": "mpa"}, "normalization must be one of"),
            ({"eps": -1.0}, "eps must be a float >= 0"),
            ({"tol": 0.0}, "tol must be a float > 0"),
            ({"backward_tol": -1.0, "method": "mpa"}, "backward_tol must be None"),
        ],
    )
    def test_option_errors(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            covpool.inv_sqrtm(torch.eye(3), **kwargs)

    def test_indefinite_input_is_reported(self):
        with pytest.raises(ValueError, match="positive semi-definite"):
            covpool.sqrtm(torch.diag(torch.tensor([1.0, -1.0])), method="mpa")

    def test_checks_can_be_skipped(self):
        A = torch.eye(3)
        torch.testing.assert_close(covpool.sqrtm(A, method="mpa", check_input=False), A)


@pytest.mark.cuda
class TestCuda:
    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh", "auto"])
    def test_matches_cpu(self, name, method):
        fn, _ = ROOTS[name]
        A = random_spd(4, n=64, condition=100, dtype=torch.float32)
        torch.testing.assert_close(
            fn(A.cuda(), method=method).cpu(), fn(A, method=method), rtol=1e-3, atol=1e-4
        )

    def test_float16_autocast(self):
        x = torch.randn(4, 128, 32, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            cov = x.mT @ x / 128 + 0.1 * torch.eye(32, device="cuda", dtype=torch.float16)
            out = covpool.inv_sqrtm(cov, method="mpa")
        assert out.dtype == torch.float16
        reference = reference_root(cov.detach().double().cpu(), inverse=True)
        assert relative_error(out.double().cpu(), reference).max() < 1e-2


class TestAutoRules:
    @pytest.mark.parametrize(
        ("device", "tol", "n", "matrices", "expected"),
        [
            ("cpu", 1e-3, 256, 64, "eigh"),
            ("cuda", 1e-3, 32, 256, "eigh"),
            ("cuda", 1e-3, 128, 1, "eigh"),
            ("cuda", 1e-3, 512, 1, "mtp"),
            ("cuda", 1e-3, 64, 16, "mtp"),
            ("cuda", 1e-6, 256, 64, "eigh"),
        ],
    )
    def test_measured_rules(self, device, tol, n, matrices, expected):
        assert choose_method(torch.device(device), tol, n, matrices) == expected
