"""covpool.sqrtm / covpool.inv_sqrtm: accuracy, certified tolerances, gradients, modes, bad input."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

import covpool
from covpool.checks import check_finite
from covpool.linalg.planner import plan_root
from covpool.testing import (
    assert_relative_close,
    random_covariance,
    random_spd,
    reference_gradient,
    reference_root,
    relative_error,
)

ROOTS = {"sqrtm": (covpool.sqrtm, False), "inv_sqrtm": (covpool.inv_sqrtm, True)}
STUDIES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "studies"


def run_study(script: str, *args: str) -> None:
    """Run a study of ``examples/studies`` as a script, as a user would."""
    done = subprocess.run(
        [sys.executable, str(STUDIES / script), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-2000:]


FAST_METHODS = ["mtp", "mpa", "eigh", "auto"]


def forward_and_gradient(fn, A, upstream, **kwargs):
    A = A.clone().requires_grad_(True)
    out = fn(A, **kwargs)
    (grad,) = torch.autograd.grad(out, A, upstream)
    return out.detach(), grad


def ridged(A: torch.Tensor, eps: float) -> torch.Tensor:
    """``A + eps (tr A / n) I`` in float64: the matrix a call with ``eps`` takes the root of."""
    mean = A.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return A + eps * mean * torch.eye(A.shape[-1], dtype=A.dtype)


def ridge_adjoint(X: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient with respect to ``A`` from the gradient ``X`` with respect to ``A + eps (tr A / n) I``."""
    trace = X.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    return X + (eps / X.shape[-1]) * trace * torch.eye(X.shape[-1], dtype=X.dtype)


class TestAccuracy:
    """Every fast method, both roots, in every dtype, against float64 eigendecomposition."""

    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", FAST_METHODS)
    @pytest.mark.parametrize("n", [16, 64, 256])
    @pytest.mark.parametrize("condition", [10.0, 1e3])
    def test_default_tolerance_met(self, name, method, n, condition, dtype, device):
        fn, inverse = ROOTS[name]
        A64 = random_spd(2, n=n, condition=condition)
        upstream = torch.randn(2, n, n, dtype=torch.float64)
        out, grad = forward_and_gradient(fn, A64.to(device, dtype), upstream.to(device, dtype), method=method)
        assert out.dtype == dtype
        assert_relative_close(out.cpu(), reference_root(A64, inverse=inverse), what=f"{method} forward")
        exact = reference_gradient(A64, upstream, inverse=inverse)
        assert_relative_close(grad.cpu(), exact, what=f"{method} gradient")

    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    @pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-8])
    @pytest.mark.parametrize(("n", "samples"), [(32, 16), (64, 49)])
    def test_ridge_certifies_tolerance_on_rank_deficient_covariances(self, name, method, tol, n, samples):
        # float64, so that rounding does not hide the schedule: the certificate is exact arithmetic's.
        fn, inverse = ROOTS[name]
        A = random_covariance(2, n=n, samples=samples)
        upstream = torch.randn(2, n, n, dtype=torch.float64)
        out, grad = forward_and_gradient(fn, A, upstream, method=method, tol=tol, eps=1e-4)
        target = ridged(A, 1e-4)
        assert_relative_close(out, reference_root(target, inverse=inverse), rtol=tol, what="forward")
        exact = ridge_adjoint(reference_gradient(target, upstream, inverse=inverse), 1e-4)
        assert_relative_close(grad, exact, rtol=tol, what="gradient")

    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("condition", [1e2, 1e4, 1e6])
    def test_condition_option_certifies_tolerance(self, name, condition):
        fn, inverse = ROOTS[name]
        A = random_spd(2, n=32, condition=condition)
        upstream = torch.randn(2, 32, 32, dtype=torch.float64)
        out, grad = forward_and_gradient(fn, A, upstream, method="mtp", tol=1e-6, condition=condition)
        assert_relative_close(out, reference_root(A, inverse=inverse), rtol=1e-6)
        assert_relative_close(grad, reference_gradient(A, upstream, inverse=inverse), rtol=1e-6)

    @pytest.mark.parametrize("name", ROOTS)
    def test_paper_configuration_is_reachable_and_loses_accuracy_when_ill_conditioned(self, name):
        fn, inverse = ROOTS[name]
        A64 = random_spd(2, n=64, condition=1e3)
        upstream = torch.randn(2, 64, 64, dtype=torch.float64)
        out, grad = forward_and_gradient(fn, A64, upstream, **covpool.PAPER_CONFIG)
        forward_error = relative_error(out, reference_root(A64, inverse=inverse)).max()
        gradient_error = relative_error(grad, reference_gradient(A64, upstream, inverse=inverse)).max()
        assert forward_error > 1e-2 and gradient_error > 1e-2
        default_error = relative_error(fn(A64, method="mpa"), reference_root(A64, inverse=inverse)).max()
        assert default_error < forward_error / 100

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
            {"method": "mtp", "tol": 1e-10},
            {"method": "mtp", "tol": 1e-10, "degree": 1},
            {"method": "mtp", "tol": 1e-10, "degree": 4},
            {"method": "mpa", "tol": 1e-10},
            {"method": "mpa", "degree": 12, "steps": 1, "backward_steps": 30, "normalization": "frobenius"},
            {"method": "ns", "steps": 14},
            {"method": "eigh"},
        ],
        ids=["mtp", "mtp-d1", "mtp-d4", "mpa", "mpa-single-approximant", "ns", "eigh"],
    )
    def test_gradcheck_float64(self, name, kwargs):
        fn, _ = ROOTS[name]
        A = random_spd(2, n=5, condition=4.0)
        if kwargs.get("steps") == 1:
            A = A + 3 * torch.eye(5, dtype=A.dtype)  # a single approximant needs a well-conditioned A
        assert torch.autograd.gradcheck(
            lambda a: fn(a, **kwargs), (A.requires_grad_(),), atol=1e-6, rtol=1e-5
        )

    @pytest.mark.parametrize("name", ROOTS)
    def test_eigh_gradient_is_exact_at_repeated_eigenvalues(self, name):
        fn, inverse = ROOTS[name]
        A = torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.5], dtype=torch.float64))
        upstream = torch.randn(4, 4, dtype=torch.float64)
        _, grad = forward_and_gradient(fn, A, upstream, method="eigh")
        torch.testing.assert_close(grad, reference_gradient(A, upstream, inverse=inverse))

    @pytest.mark.parametrize("method", ["mpa", "mtp", "eigh"])
    def test_double_backward_raises_instead_of_dropping_the_term(self, method):
        A = random_spd(2, n=4, condition=10).requires_grad_(True)
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.grad(covpool.sqrtm(A, method=method).square().sum(), A, create_graph=True)

    @pytest.mark.parametrize("method", ["mpa", "mtp", "eigh"])
    def test_gradient_penalty_and_hessian_raise(self, method):
        x = torch.randn(3, 10, 4, dtype=torch.float64, requires_grad=True)

        def loss(t):
            return covpool.sqrtm(covpool.functional.covariance(t), method=method, eps=0.1).sum()

        with pytest.raises(RuntimeError, match="double backward"):
            (grad,) = torch.autograd.grad(loss(x), x, create_graph=True)
            grad.square().sum().backward()
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.functional.hessian(loss, x[:1].detach())

    @pytest.mark.parametrize(
        "options", [{"method": "ns", "steps": 8}, {"method": "mpa", "backward": "unrolled", "tol": 1e-8}]
    )
    def test_autograd_backwards_support_exact_double_backward(self, options):
        A = random_spd(1, n=4, condition=4.0).requires_grad_(True)
        assert torch.autograd.gradgradcheck(lambda a: covpool.sqrtm(a, **options), (A,))

    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    def test_gradient_is_symmetric(self, method):
        A = random_spd(3, n=16, condition=100)
        _, grad = forward_and_gradient(
            covpool.sqrtm, A, torch.randn(3, 16, 16, dtype=torch.float64), method=method
        )
        torch.testing.assert_close(grad, grad.mT)

    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    def test_backward_memory_does_not_grow_with_steps(self, method):
        A = random_spd(2, n=16, condition=100).requires_grad_(True)

        def saved_bytes(**kwargs) -> int:
            sizes = []

            def pack(t):
                sizes.append(t.numel() * t.element_size())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                covpool.sqrtm(A, method=method, check_input=False, **kwargs)
            return sum(sizes)

        assert saved_bytes(steps=2) == saved_bytes(steps=8) > 0
        assert saved_bytes(steps=2, backward_steps=3) == saved_bytes(steps=2, backward_steps=12)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_smaller_tolerance_costs_more_products(self, dtype):
        def products(tol: float) -> int:
            return plan_root(
                covpool.RootOptions(method="mtp", tol=tol),
                64,
                eps=0.0,
                device=torch.device("cpu"),
                dtype=dtype,
            ).products()

        assert products(1e-2) <= products(1e-3) < products(1e-5)
        if dtype == torch.float64:
            assert products(1e-5) < products(1e-8)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_tol_below_the_products_rounding_is_refused(self, dtype):
        floor = 8 * torch.finfo(dtype).eps
        match = rf"tol={floor / 2:g} is below what {dtype} products can deliver"
        with pytest.raises(ValueError, match=match):
            covpool.sqrtm(random_spd(2, n=8, dtype=dtype), method="mtp", tol=floor / 2)
        # at the floor, rounding grows with κ: accepted where the promised condition is small
        A = random_spd(2, n=8, condition=100, dtype=dtype)
        covpool.sqrtm(A, method="mtp", tol=floor * 1.01, condition=100)
        with pytest.raises(ValueError, match="cannot be certified for method='mtp' at condition=1000"):
            covpool.sqrtm(random_spd(2, n=8, dtype=dtype), method="mtp", tol=floor * 1.01)


def head_covariances(n: int, samples: int = 49, batch: int = 4) -> torch.Tensor:
    """What a covariance head pools: fewer positions than channels, so rank ``samples - 1``."""
    return random_covariance(batch, n=n, samples=samples, generator=torch.Generator().manual_seed(n))


def on_range(grad: torch.Tensor, A: torch.Tensor, rank: int) -> torch.Tensor:
    """``grad`` applied to the range of the rank-``rank`` PSD ``A``: all of a gradient that reaches features.

    For ``A = X Xᵀ / N`` the features get ``(G + Gᵀ) X / N`` and the columns of ``X`` lie in that range;
    the rest of ``G`` (its null-space block, the largest entries, set by the ridge's eigenvalues, which
    rounding ``A`` to float32 already moves by 1e-3) reaches nothing.
    """
    basis = torch.linalg.eigh(A.double())[1][..., -rank:]
    return grad.double() @ basis


class TestUnrolledBackward:
    """``backward="unrolled"``: reverse mode through the steps (fused adjoint for mtp, autograd for mpa)."""

    @pytest.mark.parametrize("degrees", [(1,), (2,), (3,), (4,), (1, 2, 3, 4)])
    @pytest.mark.parametrize("receives", ["Y", "Z", "both"])
    def test_fused_adjoint_is_autograd_through_the_same_steps(self, degrees, receives):
        from covpool.linalg.iteration import coupled_root
        from covpool.linalg.schedule import differentiable_schedule, minimax_schedule
        from covpool.linalg.unrolled import coupled_root_adjoint

        A_hat = random_spd(3, n=12, condition=100)
        A_hat = A_hat / torch.linalg.matrix_norm(A_hat, ord=2, keepdim=True)
        schedule = differentiable_schedule(minimax_schedule(0.1, 1.0001, 1e-4, degrees=degrees), 1e-4)
        grad_Y = torch.randn_like(A_hat) if receives in ("Y", "both") else None
        grad_Z = torch.randn_like(A_hat) if receives in ("Z", "both") else None
        leaf = A_hat.clone().requires_grad_(True)
        Y, Z = coupled_root(leaf, schedule)
        pairs = [(Y, grad_Y), (Z, grad_Z)]
        (expected,) = torch.autograd.grad(sum((out * g).sum() for out, g in pairs if g is not None), leaf)
        record: list[torch.Tensor] = []
        coupled_root(A_hat, schedule, record)
        got = coupled_root_adjoint(schedule, tuple(record), grad_Y, grad_Z)
        assert_relative_close(got, expected, rtol=1e-12, what="fused adjoint")

    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    @pytest.mark.parametrize("tol", [1e-3, 1e-6])
    def test_gradient_meets_tol_on_ridged_rank_deficient_covariances(self, name, method, tol):
        fn, inverse = ROOTS[name]
        A, eps = head_covariances(64), 1e-4
        upstream = torch.randn_like(A)
        _, grad = forward_and_gradient(fn, A, upstream, method=method, tol=tol, eps=eps, backward="unrolled")
        expected = ridge_adjoint(reference_gradient(ridged(A, eps), upstream, inverse=inverse), eps)
        assert_relative_close(grad, expected, rtol=tol, what=f"{method} unrolled gradient")

    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    def test_float32_default_gradient_on_a_heads_covariance(self, name, method):
        fn, inverse = ROOTS[name]
        A, eps = head_covariances(128), 1e-4
        plan = plan_root(
            covpool.RootOptions(method=method), 128, eps=eps, device=torch.device("cpu"), dtype=torch.float32
        )
        assert plan.gradient == ("adjoint" if method == "mtp" else "autograd")
        A, upstream = A.float(), torch.randn_like(A).float()
        _, grad = forward_and_gradient(fn, A, upstream, method=method, eps=eps)
        # Against the root of the rounded input: rounding A to float32 alone moves the null space's
        # eigenvalues, and with them the largest entries of the gradient, by more than 1e-3.
        expected = ridge_adjoint(reference_gradient(ridged(A.double(), eps), upstream, inverse=inverse), eps)
        # The inverse root's gradient is κ^(1/2) times more sensitive: float32 eigh itself is 4e-3 off
        # here, the Lyapunov backward 3e-2.
        rtol = 5e-3 if inverse else 1e-3
        assert_relative_close(
            on_range(grad, A, 48), on_range(expected, A, 48), rtol=rtol, what=f"float32 {method} gradient"
        )

    @pytest.mark.parametrize(("n", "samples", "eps"), [(32, 8, 1e-2), (64, 16, 1e-4), (128, 32, 1e-5)])
    def test_lyapunov_rounding_model_bounds_the_float32_error(self, n, samples, eps):
        from covpool.linalg.lyapunov import rounding_error

        A = head_covariances(n, samples)
        A, upstream = A.float(), torch.randn_like(A).float()
        _, grad = forward_and_gradient(covpool.sqrtm, A, upstream, method="mtp", eps=eps, backward="minimax")
        expected = ridge_adjoint(reference_gradient(ridged(A.double(), eps), upstream), eps)
        plan = plan_root(
            covpool.RootOptions(method="mtp"), n, eps=eps, device=torch.device("cpu"), dtype=torch.float32
        )
        bound = rounding_error(plan.lower, torch.finfo(torch.float32).eps) + 1e-3
        rank = samples - 1
        assert_relative_close(
            on_range(grad, A, rank), on_range(expected, A, rank), rtol=bound, what="float32 Lyapunov gradient"
        )

    def test_default_backward_follows_the_rounding_model(self):
        def gradient(dtype, eps, method="mtp"):
            return plan_root(
                covpool.RootOptions(method=method), 256, eps=eps, device=torch.device("cuda"), dtype=dtype
            ).gradient

        assert gradient(torch.float32, 0.0) == "lyapunov"  # condition 1e3
        assert gradient(torch.float32, 1e-4) == "adjoint"  # a head's ridge: κ up to 2.6e6
        assert gradient(torch.float64, 1e-4) == "lyapunov"
        assert gradient(torch.float32, 1e-4, "mpa") == "autograd"

    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    @pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-6])
    @pytest.mark.parametrize("eps", [0.0, 1e-4])
    def test_lyapunov_plan_splits_tol_between_forward_and_backward(self, method, tol, eps):
        # The gradient solves with the computed roots: to first order it takes the forward's error once,
        # and the solver's on top (test_ridge_certifies_tolerance_on_rank_deficient_covariances measures it).
        plan = plan_root(
            covpool.RootOptions(method=method, tol=tol, backward="minimax"),
            64,
            eps=eps,
            device=torch.device("cpu"),
            dtype=torch.float64,
        )
        assert plan.forward.error + plan.backward.error <= tol, plan

    def test_fused_backward_refuses_double_backward(self):
        A = head_covariances(16, samples=8).float().requires_grad_(True)
        out = covpool.sqrtm(A, method="mtp", eps=1e-4, backward="unrolled")
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.grad(out.square().sum(), A, create_graph=True)


class TestAutoDecompositionPrecision:
    """``method="auto"`` on CPU: eigh decomposes in float32 where the matrix's own eigenvalues certify
    ``tol`` (:data:`covpool.linalg.eigh.FLOAT32_GROWTH`), in float64 elsewhere."""

    @staticmethod
    def _record_decompositions(monkeypatch) -> list[tuple[torch.dtype, int]]:
        seen = []
        eigh = torch.linalg.eigh

        def recording(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append((A.dtype, A.shape[0]))
            return eigh(A)

        monkeypatch.setattr(torch.linalg, "eigh", recording)
        return seen

    def test_only_the_matrices_that_need_float64_are_decomposed_again(self, monkeypatch):
        A = torch.cat([random_spd(3, n=16, condition=10), random_spd(2, n=16, condition=1e6)]).float()
        seen = self._record_decompositions(monkeypatch)
        covpool.sqrtm(A)
        assert seen == [(torch.float32, 5), (torch.float64, 2)]
        seen.clear()
        covpool.sqrtm(A[:3])  # the common case: one float32 decomposition
        assert seen == [(torch.float32, 3)]
        seen.clear()
        covpool.sqrtm(A, method="eigh")  # the exact path: float64 for every matrix
        assert seen == [(torch.float64, 5)]
        seen.clear()
        covpool.sqrtm(A[:3], tol=1e-6)  # 5 u κ = 6e-6 at κ = 10: beyond this tol in float32
        assert seen == [(torch.float32, 3), (torch.float64, 3)]

    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("tol", [1e-3, 1e-5])
    def test_forward_and_gradient_within_tol_on_a_mixed_batch(self, name, tol):
        root, inverse = ROOTS[name]
        well = random_spd(3, n=32, condition=30)
        ill = random_covariance(3, n=32, samples=8) + 1e-3 * torch.eye(32, dtype=torch.float64)  # κ ≈ 3e5
        A = torch.cat([well, ill]).float()
        upstream = torch.randn_like(A)
        out, grad = forward_and_gradient(root, A, upstream, tol=tol)
        assert_relative_close(out, reference_root(A, inverse=inverse), rtol=tol)
        assert_relative_close(
            grad, reference_gradient(A.double(), upstream.double(), inverse=inverse), rtol=tol
        )

    def test_the_study_behind_the_constant_leaves_twofold_room(self, tmp_path):
        out = tmp_path / "eigh_precision.json"
        run_study("eigh_precision.py", "--sizes", "16", "32", "--batch", "2", "--out", str(out))
        summary = json.loads(out.read_text())["summary"]
        assert summary["FLOAT32_GROWTH"] == covpool.linalg.eigh.FLOAT32_GROWTH
        assert summary["room"] >= 2.0


class TestPlanCache:
    def test_a_plan_is_resolved_once_per_options_size_ridge_and_dtype(self):
        cpu = torch.device("cpu")
        first = plan_root(covpool.RootOptions(method="mtp"), 24, eps=1e-4, device=cpu, dtype=torch.float32)
        # Equal options built anew (as every call from keywords does) find the same plan object.
        assert (
            plan_root(covpool.RootOptions(method="mtp"), 24, eps=1e-4, device=cpu, dtype=torch.float32)
            is first
        )
        others = [
            plan_root(
                covpool.RootOptions(method="mtp", tol=1e-4), 24, eps=1e-4, device=cpu, dtype=torch.float32
            ),
            plan_root(covpool.RootOptions(method="mtp"), 25, eps=1e-4, device=cpu, dtype=torch.float32),
            plan_root(covpool.RootOptions(method="mtp"), 24, eps=1e-3, device=cpu, dtype=torch.float32),
            plan_root(covpool.RootOptions(method="mtp"), 24, eps=1e-4, device=cpu, dtype=torch.float64),
        ]
        assert all(other is not first for other in others)


class TestNormalization:
    """``Â = A / c``: the spectrum the schedules are certified on, and the default choice of ``c``."""

    @pytest.mark.parametrize("normalization", ["schatten8", "frobenius", "trace"])
    @pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
    def test_ridged_spectrum_lies_in_the_certified_interval(self, normalization, scale):
        from covpool.linalg.normalization import normalise
        from covpool.numerics import with_relative_ridge

        n, eps = 96, 1e-4
        A = head_covariances(n) * scale
        plan = plan_root(
            covpool.RootOptions(method="mtp", normalization=normalization),
            n,
            eps=eps,
            device=torch.device("cpu"),
            dtype=torch.float64,
        )
        A_hat, _ = normalise(with_relative_ridge(A, eps), normalization)
        eigenvalues = torch.linalg.eigvalsh(A_hat)
        assert eigenvalues.min() >= plan.lower**2 * (1 - 1e-9), (normalization, eigenvalues.min().item())
        assert eigenvalues.max() <= 1 + 1e-12, (normalization, eigenvalues.max().item())

    @pytest.mark.parametrize("n", [16, 64, 256])
    @pytest.mark.parametrize("samples", [8, 49])
    @pytest.mark.parametrize("profile", ["flat", "decaying"])
    def test_float32_covariance_stays_above_the_trace_bound(self, n, samples, profile):
        # With the trace, a rank-deficient input sits on the ridge's bound, so the bound must leave room
        # for the rounding of the input: computed in float32 as a head computes it.
        from covpool.linalg.normalization import normalise
        from covpool.numerics import with_relative_ridge

        eps = 1e-4
        generator = torch.Generator().manual_seed(n + samples)
        X = torch.randn(16, n, samples, generator=generator)
        if profile == "decaying":
            X = X * torch.logspace(0, -2, n)[:, None]
        X = X - X.mean(-1, keepdim=True)
        A = X @ X.mT / samples
        plan = plan_root(
            covpool.RootOptions(method="mtp"), n, eps=eps, device=torch.device("cpu"), dtype=A.dtype
        )
        assert plan.normalization == "trace"
        A_hat, _ = normalise(with_relative_ridge(A, eps), "trace")
        smallest = torch.linalg.eigvalsh(A_hat.double()).min()
        assert smallest >= plan.lower**2, (smallest.item(), plan.lower**2)

    def test_default_is_the_trace_where_the_ridge_sets_the_bound(self):
        def plan(n=64, dtype=torch.float32, **kwargs):
            eps = kwargs.pop("eps")
            options = covpool.RootOptions(method="mtp", **kwargs)
            return plan_root(options, n, eps=eps, device=torch.device("cuda"), dtype=dtype)

        ridge, no_ridge = plan(eps=1e-4), plan(eps=0.0)
        assert ridge.normalization == "trace"
        assert ridge.lower**2 >= 0.9 * plan(eps=1e-4, normalization="schatten8").lower ** 2
        assert no_ridge.normalization == "schatten8"
        assert no_ridge.lower**2 > plan(eps=0.0, normalization="trace").lower ** 2 * 30  # n^(7/8) = 38
        # A ridge weaker than the condition bound: the Schatten-8 norm certifies more.
        assert plan(eps=1e-9, condition=1e3).normalization == "schatten8"
        # A ridge near the rounding level (ZCA's), or small against n: the trace's room would cost > 10 %.
        assert plan(eps=torch.finfo(torch.float32).eps).normalization == "schatten8"
        assert plan(n=512, eps=1e-4).normalization == "schatten8"
        assert plan(n=512, eps=1e-4, dtype=torch.float64).normalization == "trace"
        assert plan(eps=1e-4, normalization="frobenius").normalization == "frobenius"

    def test_trace_with_a_ridge_at_the_rounding_level_is_refused(self):
        A = head_covariances(64).float()
        with pytest.raises(
            ValueError, match="normalization=.trace. certifies no spectrum bound with eps=1.19209e-07 at n=64"
        ):
            covpool.sqrtm(A, method="mtp", normalization="trace", eps=torch.finfo(torch.float32).eps)
        options = covpool.RootOptions(method="mtp", normalization="trace", condition=1e5)  # stands in
        plan = plan_root(
            options, 64, eps=1e-7, device=A.device, dtype=torch.float64
        )  # float32 at 1e5: refused
        assert plan.lower == pytest.approx((1e5 * 64) ** -0.5)


class TestShapesAndDtypes:
    @pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_any_leading_batch_dimensions(self, batch_shape, method):
        A = random_spd(*batch_shape, n=6, condition=10)
        out = covpool.sqrtm(A, method=method, steps=8 if method == "ns" else None)
        assert out.shape == A.shape
        torch.testing.assert_close(out @ out, A, rtol=1e-3, atol=1e-3)

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    @pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 0), (0, 0)])
    def test_empty_input_gives_empty_output_and_gradient(self, method, shape):
        A = torch.zeros(shape, requires_grad=True)
        out = covpool.inv_sqrtm(A, method=method)
        out.sum().backward()
        assert out.shape == A.shape and A.grad.shape == A.shape

    @pytest.mark.parametrize("method", ["mpa", "mtp", "eigh"])
    def test_one_by_one(self, method):
        assert covpool.inv_sqrtm(torch.tensor([[4.0]]), method=method).item() == pytest.approx(0.5, rel=1e-3)

    @pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("name", ROOTS)
    def test_half_precision_is_computed_in_float32(self, low, name):
        fn, inverse = ROOTS[name]
        A64 = random_spd(2, n=16, condition=10)
        A = A64.to(low).requires_grad_(True)
        out = fn(A, method="mtp")
        out.sum().backward()
        assert out.dtype == low and A.grad.dtype == low
        assert_relative_close(
            out.double(), reference_root(A.detach().double(), inverse=inverse), rtol=4 * torch.finfo(low).eps
        )

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_cpu_bfloat16_autocast(self, method):
        x = torch.randn(4, 64, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cov = x.mT @ x / 64 + 0.1 * torch.eye(16, dtype=torch.bfloat16)
            assert cov.dtype == torch.bfloat16
            out = covpool.sqrtm(cov, method=method, steps=10 if method == "ns" else None)
        assert out.dtype == torch.bfloat16
        assert_relative_close(out.double(), reference_root(cov.detach().double()), rtol=0.02)

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_non_symmetric_input_uses_its_symmetric_part(self, method):
        A = random_spd(2, n=8, condition=10)
        skew = torch.randn(2, 8, 8, dtype=torch.float64)
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
        # Batched LU (torch.linalg.solve) has failed on 32x256x256 SPD batches with 2 threads; the Padé
        # denominators are solved by Cholesky.
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            A64 = random_spd(32, n=256, condition=1e3)
            out = covpool.inv_sqrtm(A64.float(), method="mpa")
        finally:
            torch.set_num_threads(threads)
        assert_relative_close(out, reference_root(A64, inverse=True).float())

    @pytest.mark.skipif(
        torch.torch_version.TorchVersion(torch.__version__) < "2.12",
        reason="dynamo before torch 2.12 cannot compile the roots (seen: the options passed to the planner "
        "before 2.11, the series' Fraction exponent before 2.12)",
    )
    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh", "auto", "mtp-unrolled", "mpa-unrolled"])
    def test_torch_compile_captures_one_graph_with_default_options(
        self, method, covpool_warnings, restore_matmul_precision
    ):
        # torch's default matmul setting: under TF32/bf16 the root is one opaque operator instead
        # (tests/test_linalg_certification.py), whose backward is the exact gradient, not ns's own
        torch.set_float32_matmul_precision("highest")
        A = random_spd(2, n=8, condition=10, dtype=torch.float32).requires_grad_(True)
        method, _, backward = method.partition("-")
        options = {"method": method, **({"backward": backward} if backward else {})}

        def root(a):
            return covpool.inv_sqrtm(a, **options)

        compiled = torch.compile(root, backend="eager", fullgraph=True)
        with covpool_warnings() as caught:
            out = compiled(A)
            (grad,) = torch.autograd.grad(out.sum(), A)
        assert caught == []  # e.g. dynamo's about tracing through a functools.cache on the planner
        (expected_grad,) = torch.autograd.grad(root(A).sum(), A)
        # auto is eigh in eager CPU mode and mtp while tracing: both within the tolerance.
        assert_relative_close(out.detach(), root(A).detach())
        assert_relative_close(grad, expected_grad)

    @pytest.mark.skipif(
        torch.torch_version.TorchVersion(torch.__version__) < "2.12",
        reason="dynamo before torch 2.12 cannot compile the roots",
    )
    @pytest.mark.parametrize(
        "options",
        [{"method": "mtp", "tol": 1e-5}, {"method": "mtp", "steps": 2}, {"method": "ns", "steps": 2}],
    )
    def test_torch_compile_plans_with_the_options_given(self, options, restore_matmul_precision):
        # The planner sees the options' values while tracing, not defaults: the compiled root runs the
        # schedule the eager one does (steps=2 is far from converged, so any other schedule shows).
        torch.set_float32_matmul_precision("highest")
        A = random_spd(2, n=8, condition=10, dtype=torch.float32)
        compiled = torch.compile(lambda a: covpool.inv_sqrtm(a, **options), backend="eager", fullgraph=True)
        assert_relative_close(compiled(A), covpool.inv_sqrtm(A, **options), rtol=1e-5)

    @pytest.mark.slow
    @pytest.mark.parametrize("backward", ["minimax", "unrolled"])
    def test_torch_compile_inductor(self, backward):
        A = random_spd(2, n=8, condition=10, dtype=torch.float32).requires_grad_(True)
        options = covpool.RootOptions(method="mtp", backward=backward)
        compiled = torch.compile(lambda a: covpool.sqrtm(a, options))
        out = compiled(A)
        (grad,) = torch.autograd.grad(out.sum(), A)
        (expected_grad,) = torch.autograd.grad(covpool.sqrtm(A, options).sum(), A)
        torch.testing.assert_close(out, covpool.sqrtm(A, options), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


class TestDegenerateInput:
    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    @pytest.mark.parametrize("case", ["ridged-rank-deficient", "tiny", "huge"])
    def test_outputs_and_gradients_are_finite(self, name, method, case, dtype):
        fn, inverse = ROOTS[name]
        if dtype == torch.float32 and inverse and case == "tiny":
            pytest.skip("∂A^(-1/2)/∂A scales as |A|^(-3/2): 1e45 for |A| = 1e-30 is beyond float32")
        A = (
            {
                "ridged-rank-deficient": random_covariance(2, n=16, samples=4),
                "tiny": 1e-30 * random_spd(2, n=16, condition=10),
                "huge": 1e30 * random_spd(2, n=16, condition=10),
            }[case]
            .to(dtype)
            .requires_grad_(True)
        )
        out = fn(A, method=method, eps=1e-3 if case.startswith("ridged") else 0.0)
        (grad,) = torch.autograd.grad(out, A, torch.ones_like(out))
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_square_root_of_zero_is_zero(self, method):
        assert torch.equal(covpool.sqrtm(torch.zeros(2, 5, 5), method=method), torch.zeros(2, 5, 5))

    def test_square_root_of_singular_psd_matrix(self):
        A = random_covariance(2, n=16, samples=6)
        assert_relative_close(covpool.sqrtm(A, method="eigh"), reference_root(A), rtol=1e-3)

    @pytest.mark.parametrize("method", ["mpa", "mtp"])
    def test_singular_matrix_is_flagged_without_a_ridge_and_certified_with_one(self, method):
        # Its forward is accurate, but its gradient is infinite: no finite gradient is within tol.
        A = random_covariance(2, n=16, samples=6)
        with pytest.raises(ValueError, match=r"not positive definite|κ\(A\)"):
            covpool.sqrtm(A, method=method, condition=1e12, tol=1e-4)
        out, grad = forward_and_gradient(
            covpool.sqrtm, A, torch.eye(16).expand(2, 16, 16).double(), method=method, eps=1e-6, tol=1e-4
        )
        target = ridged(A, 1e-6)
        assert_relative_close(out, reference_root(target), rtol=1e-4)
        exact = ridge_adjoint(reference_gradient(target, torch.eye(16).expand(2, 16, 16).double()), 1e-6)
        assert_relative_close(grad, exact, rtol=1e-4)

    @pytest.mark.parametrize("method", ["mpa", "mtp", "eigh"])
    @pytest.mark.parametrize("scale", [1e-30, 1e30])
    def test_float32_square_root_is_scale_equivariant(self, method, scale):
        A = random_spd(2, n=16, condition=10, dtype=torch.float32)
        out = covpool.sqrtm(scale * A, method=method)
        torch.testing.assert_close(out / scale**0.5, covpool.sqrtm(A, method=method), rtol=1e-4, atol=1e-6)

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_gradient_includes_the_ridge(self, method):
        A = random_covariance(2, n=5, samples=3).requires_grad_(True)
        kwargs = {"steps": 14} if method == "ns" else {"tol": 1e-10} if method in ("mtp", "mpa") else {}
        assert torch.autograd.gradcheck(
            lambda a: covpool.sqrtm(a, method=method, eps=0.1, **kwargs), (A,), atol=1e-6, rtol=1e-5
        )


class TestBadInput:
    @pytest.mark.parametrize(
        ("A", "error", "match"),
        [
            (torch.ones(3), ValueError, r"A must have shape \(\*, n, n\).*got shape \(3,\)"),
            (torch.ones(2, 3, 4), ValueError, r"square.*\(2, 3, 4\)"),
            (torch.ones(3, 3, dtype=torch.int64), TypeError, "real floating dtype.*torch.int64"),
            (torch.ones(3, 3, dtype=torch.complex64), TypeError, "complex64"),
            (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, r"NaN or Inf in the matrix"),
            (
                torch.eye(2).expand(3, 2, 2).clone().index_fill_(0, torch.tensor([1]), float("inf")),
                ValueError,
                r"batch entries \[1\]",
            ),
            ([[1.0]], TypeError, "torch.Tensor.*list"),
        ],
    )
    def test_input_errors_name_argument_and_expectation(self, A, error, match):
        with pytest.raises(error, match=match):
            covpool.sqrtm(A)

    @pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
    def test_every_nonfinite_entry_is_found_and_huge_finite_ones_pass(self, value):
        A = torch.eye(3).expand(4, 3, 3).clone()
        A[2, 1, 0] = A[2, 0, 1] = value
        with pytest.raises(ValueError, match=r"NaN or Inf in batch entries \[2\] \(1 of 4\)"):
            check_finite(A)
        A[2] = torch.full((3, 3), torch.finfo(torch.float32).max)  # its sum overflows; it is finite
        A[3] = torch.full((3, 3), torch.finfo(torch.float32).tiny / 2)
        check_finite(A)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"method": "svd"}, "method must be one of"),
            ({"method": "mpa", "degree": 0}, "degree must be an integer >= 1, got 0"),
            ({"method": "mtp", "steps": 2.5}, "steps must be an integer"),
            ({"normalization": "power", "method": "mpa"}, "normalization must be one of"),
            ({"eps": -1.0}, "eps must be a finite float >= 0"),
            ({"eps": float("inf")}, "eps must be a finite float >= 0, got inf"),
            ({"tol": 0.0}, "tol must be a finite float > 0"),
            ({"tol": 2.0}, "tol is a relative error and must be below 1, got 2.0"),
            ({"method": "eigh", "steps": 3}, "steps is not used by method='eigh'"),
            ({"method": "eigh", "tol": 1e-3}, "tol is not used by method='eigh'"),
            ({"method": "ns", "degree": 2}, "degree is not used by method='ns'"),
            ({"method": "auto", "steps": 2}, "steps is not used by method='auto'"),
            ({"method": "mtp", "backward": "newton-schulz"}, "needs backward_steps"),
            ({"method": "mtp", "backward": "unrolled", "backward_steps": 4}, "backward_steps is not used by"),
            ({"method": "mpa", "backward": "unrolled", "steps": 1}, "needs an iteration"),
            ({"method": "mtp", "backward": "adjoint"}, "backward must be one of"),
        ],
    )
    def test_option_errors_are_the_same_on_every_device(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            covpool.inv_sqrtm(torch.eye(3), **kwargs)

    def test_options_object_and_keywords_are_exclusive(self):
        with pytest.raises(ValueError, match="not both"):
            covpool.sqrtm(torch.eye(2), covpool.RootOptions(method="mtp"), tol=1e-4)

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh", "auto"])
    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize(
        "A", [-torch.eye(3), torch.diag(torch.tensor([1.0, -1.0, 2.0]))], ids=["negative", "indefinite"]
    )
    def test_non_psd_input_raises_with_checks_and_is_nan_without(self, method, name, A):
        fn, _ = ROOTS[name]
        with pytest.raises(ValueError, match="positive (semi-)?definite"):
            fn(A, method=method)
        assert torch.isnan(fn(A, method=method, check_input=False)).all()

    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh"])
    def test_inverse_root_of_singular_matrix_is_refused(self, method):
        with pytest.raises(ValueError, match="positive definite"):
            covpool.inv_sqrtm(torch.zeros(3, 3), method=method)

    def test_only_the_invalid_batch_entries_are_nan(self):
        A = torch.eye(3).repeat(3, 1, 1)
        A[1] = -A[1]
        out = covpool.sqrtm(A, method="mtp", check_input=False)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()

    def test_spectrum_beyond_the_certified_bound_is_reported(self):
        A = random_spd(2, n=32, condition=1e7)
        with pytest.raises(
            ValueError,
            match=r"condition=1000 is assumed.*κ\(A\): 1e\+07, 1e\+07. Pass eps=.*condition= at least that κ",
        ):
            covpool.inv_sqrtm(A, method="mtp")
        assert_relative_close(
            covpool.inv_sqrtm(A, method="mtp", condition=1e7), reference_root(A, inverse=True)
        )


@pytest.mark.cuda
class TestCuda:
    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eigh", "auto"])
    def test_matches_cpu(self, name, method):
        fn, _ = ROOTS[name]
        A = random_spd(4, n=64, condition=100, dtype=torch.float32)
        assert_relative_close(fn(A.cuda(), method=method).cpu(), fn(A, method=method), rtol=2e-3)

    def test_float16_autocast(self):
        x = torch.randn(4, 128, 32, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            cov = x.mT @ x / 128 + 0.1 * torch.eye(32, device="cuda", dtype=torch.float16)
            out = covpool.inv_sqrtm(cov, method="mpa")
        assert out.dtype == torch.float16
        assert_relative_close(
            out.double().cpu(), reference_root(cov.detach().double().cpu(), inverse=True), rtol=1e-2
        )

    @pytest.mark.parametrize("name", ROOTS)
    def test_default_options_never_synchronise(self, name):
        fn, _ = ROOTS[name]
        A = random_spd(8, n=32, condition=1e3, dtype=torch.float32, device="cuda").requires_grad_()
        fn(A).sum().backward()  # first call: lazy initialisation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(A).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def test_forward_and_backward_capture_in_a_cuda_graph(self):
        A64 = random_spd(8, n=32, condition=1e3, device="cuda")
        upstream = torch.randn(8, 32, 32, device="cuda")
        A = A64.float().requires_grad_()  # a fresh leaf, first used on the side stream below
        grads = []

        def step() -> None:
            grads.append(torch.autograd.grad((covpool.sqrtm(A) * upstream).sum(), A)[0])

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        exact = reference_gradient(A64.cpu(), upstream.double().cpu())
        assert_relative_close(grads[-1].cpu().double(), exact)
