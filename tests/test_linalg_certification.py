"""Never silently wrong: the products' precision is the root's own; every result is certified or flagged."""

from __future__ import annotations

import re
import threading

import pytest
import torch

import covpool
from covpool.linalg import precision
from covpool.linalg.planner import plan_root
from covpool.testing import (
    random_spd,
    reference_gradient,
    reference_root,
    relative_error,
    user_ridged_covariance,
)

ROOTS = {"sqrtm": (covpool.sqrtm, False), "inv_sqrtm": (covpool.inv_sqrtm, True)}


@pytest.fixture(params=["high", "medium"])
def reduced_precision(request, restore_matmul_precision):
    """torch's float32 matmul precision set to TF32 ("high", as Lightning advises) or bfloat16 ("medium");
    restored after. Yields the setting as :func:`precision.current_precision` reads it."""
    torch.set_float32_matmul_precision(request.param)
    return precision.current_precision()


class SeenPrecision(torch.overrides.TorchFunctionMode):
    """Records torch's float32 matmul precision at every matrix product the root makes."""

    PRODUCTS = {torch.matmul, torch.bmm, torch.baddbmm, torch.Tensor.__matmul__, torch.Tensor.matmul}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS:
            self.seen.append(precision.current_precision())
        return func(*args, **(kwargs or {}))


class TestPrecisionScope:
    @pytest.mark.parametrize("method", ["mtp", "mpa", "ns", "eigh"])
    @pytest.mark.parametrize("name", ROOTS)
    def test_products_run_at_full_precision_and_the_setting_is_restored(
        self, reduced_precision, method, name
    ):
        fn, _ = ROOTS[name]
        A = random_spd(2, n=16, dtype=torch.float32).requires_grad_(True)
        mode = SeenPrecision()
        with mode:
            out = fn(A, method=method)
            out.backward(torch.ones_like(out))
        assert reduced_precision != "highest"
        assert mode.seen and set(mode.seen) == {"highest"}, f"{method}: products ran at {set(mode.seen)}"
        assert precision.current_precision() == reduced_precision

    def test_allow_tf32_set_directly_is_restored(self):
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            before = precision.current_precision()
            assert before != "highest"
            A = random_spd(2, n=8, dtype=torch.float32)
            mode = SeenPrecision()
            with mode:
                covpool.sqrtm(A, method="mtp")
            assert set(mode.seen) == {"highest"}
            assert precision.current_precision() == before
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False

    def test_setting_is_restored_when_the_root_raises(self, reduced_precision):
        with pytest.raises(ValueError, match="positive"):
            covpool.sqrtm(-torch.eye(4).expand(2, 4, 4), method="mtp")
        assert precision._depth == 0
        assert precision.current_precision() == reduced_precision

    def test_concurrent_roots_restore_the_setting_once_all_have_left(self, reduced_precision):
        A = random_spd(4, n=32, dtype=torch.float32)
        errors: list[BaseException] = []

        def work():
            try:
                for _ in range(5):
                    covpool.sqrtm(A, method="mtp").sum()
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert precision._depth == 0
        assert precision.current_precision() == reduced_precision

    def test_float64_is_left_alone(self, reduced_precision):
        A = random_spd(2, n=8)
        mode = SeenPrecision()
        with mode:
            covpool.sqrtm(A, method="mtp")
        assert set(mode.seen) == {reduced_precision}  # float64 products have no reduced mode

    @pytest.mark.skipif(
        torch.torch_version.TorchVersion(torch.__version__) < "2.12",
        reason="dynamo before torch 2.12 cannot compile the roots (tests/test_linalg_roots.py says why)",
    )
    @pytest.mark.parametrize("name", ROOTS)
    def test_compiled_under_reduced_precision_the_root_runs_its_products_at_full_precision(
        self, reduced_precision, name, monkeypatch
    ):
        fn, _ = ROOTS[name]
        seen = []
        enter = precision._enter
        monkeypatch.setattr(
            precision, "_enter", lambda: (enter(), seen.append(precision.current_precision()))
        )

        def loss(a: torch.Tensor, method: str = "mtp") -> torch.Tensor:
            return (fn(a * 2.0, method=method) * torch.arange(64.0, dtype=a.dtype).reshape(8, 8)).sum()

        A = random_spd(2, n=8, dtype=torch.float32)
        X = A.clone().requires_grad_(True)
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        value = compiled(X)
        value.backward()
        assert seen and set(seen) == {"highest"}  # the root's scope was entered at run time
        assert precision.current_precision() == reduced_precision  # and left
        torch.set_float32_matmul_precision("highest")
        torch.testing.assert_close(value, loss(A), rtol=0, atol=0)  # the eager root's own result
        # the operator's backward is the exact gradient (float64 eigendecomposition)
        A64 = A.double().requires_grad_(True)
        loss(A64, "eigh").backward()
        assert (relative_error(X.grad, A64.grad) < 1e-5).all()
        torch._dynamo.reset()

    @pytest.mark.parametrize("user", ["highest", "high"])
    def test_tf32_phase_sets_tf32_inside_the_scope_and_restores_it(self, user, restore_matmul_precision):
        """A ``"tf32"`` plan's low phase on CUDA (only torch's flags are touched: no GPU needed): TF32
        inside, full precision around it, the user's setting after, also when the phase raises."""
        torch.set_float32_matmul_precision(user)
        before = precision.current_precision()
        with precision.products_in("tf32", torch.float32):
            assert precision.current_precision() == "highest"
            with pytest.raises(RuntimeError, match="in the phase"):
                with precision.tf32_products(torch.device("cuda")):
                    assert precision.current_precision() != "highest"
                    raise RuntimeError("in the phase")
            assert precision.current_precision() == "highest"
        assert precision.current_precision() == before
        assert (precision._depth, precision._tf32_owner) == (0, None)

    def test_traced_at_full_precision_is_the_users_setting_for_its_duration(self, reduced_precision):
        """What :func:`covpool.export_onnx` runs in: the setting a traced root reads is "highest" inside,
        the user's after, also while another root's scope is open around it."""
        with precision.traced_at_full_precision():
            assert precision.global_precision() == precision.current_precision() == "highest"
        assert precision.current_precision() == reduced_precision
        with precision.products_in("full", torch.float32):  # a root running (another thread)
            with precision.traced_at_full_precision():
                assert precision.global_precision() == "highest"
            assert precision.global_precision() == reduced_precision
        assert precision.current_precision() == reduced_precision

    def test_another_root_revokes_a_tf32_phase(self):
        """A root that opens its scope (another thread) while a TF32 phase runs gets full precision, and
        the phase's end does not lower it again."""
        with precision.products_in("tf32", torch.float32):
            with precision.tf32_products(torch.device("cuda")):
                assert precision.current_precision() != "highest"
                precision._enter()
                assert precision.current_precision() == "highest"
            assert precision.current_precision() == "highest"
            precision._exit()
        assert (precision._depth, precision._tf32_owner) == (0, None)

    def test_a_tf32_phase_does_not_lower_other_open_roots(self):
        with precision.products_in("tf32", torch.float32):
            precision._enter()  # a second root is open
            try:
                with precision.tf32_products(torch.device("cuda")):
                    assert precision.current_precision() == "highest"
            finally:
                precision._exit()

    def test_precision_is_a_validated_option(self):
        assert covpool.RootOptions(method="mtp", precision="full").precision == "full"
        with pytest.raises(
            ValueError, match=r"precision must be one of \('full', 'tf32', 'auto'\), got 'bf1"
        ):
            covpool.RootOptions(precision="bf16")


class TestSelfCertification:
    """Inputs beyond the assumed bound: within tol (up to the first-order factor 2) or flagged."""

    @pytest.mark.parametrize("name", ROOTS)
    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    @pytest.mark.parametrize("condition", [1e3, 1e4, 1e6])
    @pytest.mark.parametrize("kind", ["ridged", "spd"])
    def test_beyond_the_bound_is_within_tol_or_flagged(self, name, method, condition, kind, dtype):
        fn, inverse = ROOTS[name]
        n = 32
        A = (
            user_ridged_covariance(3, n, condition)
            if kind == "ridged"
            else random_spd(3, n=n, condition=condition)
        )
        X = A.to(dtype).requires_grad_(True)
        out = fn(X, method=method, check_input=False)
        upstream = torch.randn(3, n, n, dtype=torch.float64)
        out.backward(upstream.to(dtype))
        flagged = torch.isnan(out).flatten(-2).all(-1)
        forward = relative_error(out.detach().double(), reference_root(A, inverse=inverse))
        gradient = relative_error(X.grad.double(), reference_gradient(A, upstream, inverse=inverse))
        silently_wrong = ~flagged & ((forward > 2e-3) | (gradient > 2e-3))
        assert not silently_wrong.any(), (
            f"{method} {name} κ={condition:g} ({kind}, {dtype}): forward {forward.tolist()}, "
            f"gradient {gradient.tolist()}, flagged {flagged.tolist()}"
        )

    def test_flagged_entries_raise_with_their_condition_and_what_to_pass(self):
        A = torch.stack([random_spd(n=16, condition=10), random_spd(n=16, condition=1e6)])
        with pytest.raises(ValueError) as raised:
            covpool.sqrtm(A, method="mtp")
        message = str(raised.value)
        assert "condition=1000 is assumed" in message and "κ(A): 1e+06" in message
        assert "Pass eps=" in message and "condition=" in message and "method='eigh'" in message
        assert "batch entries [1] (1 of 2)" in message

    def test_flags_are_counted_on_the_device_without_a_host_read(self):
        covpool.flagged_matrices(reset=True)
        A = torch.stack([random_spd(n=16, condition=10), random_spd(n=16, condition=1e6)] * 2)
        out = covpool.sqrtm(A, method="mtp", check_input=False)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
        assert covpool.flagged_matrices() == 2
        assert covpool.flagged_matrices(reset=True) == 2 and covpool.flagged_matrices() == 0

    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    def test_indefinite_input_raises_with_checks_and_is_nan_without(self, method):
        A = random_spd(2, n=8, dtype=torch.float32)
        A[1] = A[1] - 0.5 * torch.eye(8) * A[1].diagonal().max()
        with pytest.raises(ValueError, match=r"failing batch entries \[1\]"):
            covpool.sqrtm(A, method=method, check_input=True)
        out = covpool.sqrtm(A, method=method, check_input=False)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()

    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    def test_negative_definite_float32_input_is_flagged(self, method):
        with pytest.raises(ValueError, match="positive"):
            covpool.sqrtm(-random_spd(2, n=8, dtype=torch.float32), method=method)

    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    def test_mixed_scales_in_one_batch_are_each_finite(self, method):
        A = random_spd(4, n=8, condition=10, dtype=torch.float32)
        A = A * torch.tensor([0.0, 1e-30, 1e30, 1.0])[:, None, None]
        out = covpool.sqrtm(A, method=method)
        assert torch.isfinite(out).all()
        exact = reference_root(A.double())
        assert (relative_error(out[1:].double(), exact[1:]) < 1e-3).all()
        assert torch.equal(out[0], torch.zeros(8, 8))

    def test_the_certified_reach_of_every_default_plan_is_within_tol(self):
        # The residual test of a plan with an assumed bound certifies tol wherever the spectrum lies.
        for n in (16, 64, 256):
            for dtype in (torch.float32, torch.float64):
                for method in ("mtp", "mpa"):
                    plan = plan_root(
                        covpool.RootOptions(method=method),
                        n,
                        eps=0.0,
                        device=torch.device("cpu"),
                        dtype=dtype,
                    )
                    assert plan.check.certifies <= 1e-3, (n, dtype, method, plan.check)
                    assert plan.check.limit > plan.check.valid_residual * n**0.125

    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    def test_a_promised_condition_rounding_cannot_serve_is_refused_with_the_tol_it_can(self, method):
        # float32 at κ = 1e6: rounding alone puts every method's gradient near u·κ = 0.1 (eigh: 2.4e-2)
        A = random_spd(3, n=32, condition=1e6)
        X = A.float().requires_grad_(True)
        with pytest.raises(
            ValueError, match=f"tol=0.001 cannot be certified for method='{method}'"
        ) as raised:
            covpool.sqrtm(X, method=method, condition=1e6)
        tol = float(re.search(r"pass tol >= ([0-9.e+-]+)", str(raised.value)).group(1)) * 1.01
        out = covpool.sqrtm(X, method=method, condition=1e6, tol=tol, check_input=False)
        upstream = torch.randn(3, 32, 32, dtype=torch.float64)
        out.backward(upstream.float())
        flagged = torch.isnan(out).flatten(-2).all(-1)
        forward = relative_error(out.detach().double(), reference_root(A))
        gradient = relative_error(X.grad.double(), reference_gradient(A, upstream))
        assert not (~flagged & ((forward > 2 * tol) | (gradient > 2 * tol))).any(), (tol, forward, gradient)

    @pytest.mark.parametrize("name", ROOTS)
    def test_float32_eigh_holds_tol_where_float32_decompositions_do_not(self, name):
        # decomposed in float64: a float32 eigh is off by about u·κ (gradient 2e-2 at κ = 1e6)
        fn, inverse = ROOTS[name]
        X = random_spd(3, n=32, condition=1e6).float().requires_grad_(True)
        given = X.detach().double()  # the root of the float32 input as passed
        out = fn(X, method="eigh")
        upstream = torch.randn(3, 32, 32, dtype=torch.float64)
        out.backward(upstream.float())
        assert out.dtype == X.grad.dtype == torch.float32
        assert (relative_error(out.detach(), reference_root(given, inverse=inverse)) < 1e-5).all()
        assert (relative_error(X.grad, reference_gradient(given, upstream, inverse=inverse)) < 1e-4).all()

    def test_auto_takes_eigh_where_mtp_refuses_tol(self):
        def method(n: int) -> str:
            options = covpool.RootOptions(tol=1e-5)
            return plan_root(options, n, eps=0.0, device=torch.device("cuda"), dtype=torch.float32).method

        assert method(64) == "mtp" and method(512) == "eigh"
        with pytest.raises(ValueError, match="cannot be certified for method='mtp'"):  # the refusal is kept
            plan_root(
                covpool.RootOptions(method="mtp", tol=1e-5),
                512,
                eps=0.0,
                device=torch.device("cuda"),
                dtype=torch.float32,
            )


class TestResidualTestValues:
    """The a-posteriori tests' values themselves (:func:`covpool.linalg.iteration.residual_norm`,
    :func:`~covpool.linalg.iteration.mixed_residual`) against eigenvalues placed exactly."""

    @staticmethod
    def _pair(error: float, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """``Y = I`` and ``Z`` with one eigenvalue ``1 + error`` (float32, batch of 1)."""
        generator = torch.Generator().manual_seed(0)
        Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
        values = torch.ones(n, dtype=torch.float64)
        values[0] += error
        return torch.eye(n)[None], ((Q * values) @ Q.T).float()[None]

    @pytest.mark.parametrize("error", [1e-2, 1e-4, 1e-5, 2e-6, 4e-7])
    def test_residual_norm_reads_the_eigenvalue_down_to_float32_rounding(self, error):
        """Eighth powers of entries below about 3e-6 flush to 0 in a float32 norm: the test would read 0
        and pass any limit. The norm is taken in float64."""
        from covpool.linalg.iteration import mixed_residual, residual_norm

        Y, Z = self._pair(error)
        assert residual_norm(Y, Z).item() == pytest.approx(error, rel=0.3)
        # with Â = Y² = I, the mixed test reads Z Y - I as well, and Z (Â - Y²) Z = 0
        assert mixed_residual(torch.eye(16)[None], Y, Z).item() == pytest.approx(error, rel=0.3)
