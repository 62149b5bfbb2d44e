"""The mixed-precision root (:mod:`covpool.linalg.mixed`) on emulated TF32/bfloat16 products against float64,
and the rounding models at the products' precision against the emulated runs (issue #18)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import covpool
from covpool.linalg.emulation import EPSILON, ROUNDINGS, ProductCounter, emulated_products
from covpool.linalg.iteration import coupled_root, mixed_residual, residual_rounding
from covpool.linalg.lyapunov import rounding_error, solve_lyapunov
from covpool.linalg.mixed import (
    CERTIFIED_REFINEMENTS,
    INVERSE_GROWTH,
    MAX_FITTED_SIZE,
    ROOT_GROWTH,
    TF32_DOMAIN,
    VALID_RESIDUAL_GROWTH,
    margined_schedule,
    mixed_error_bound,
    mixed_lyapunov,
    mixed_plan,
    mixed_sqrt,
    mixed_valid_residual,
)
from covpool.linalg.normalization import normalise
from covpool.linalg.planner import RootPlan, plan_root
from covpool.linalg.schedule import step_map
from covpool.numerics import with_relative_ridge
from covpool.testing import (
    bounded_matrices,
    random_covariance,
    random_spd,
    reference_gradient,
    reference_root,
    relative_error,
)

FORMATS = ("tf32", "bf16")


class TestMarginedSchedule:
    @pytest.mark.parametrize("degree", [1, 2])
    def test_certified_under_perturbed_inputs(self, degree: int) -> None:
        """Every step's input may move by the factor ``1 ± m`` and the composed map still ends within the
        schedule's error of 1."""
        margin, lower = 0.01, 0.02
        schedule = margined_schedule(lower, 1.0, 1e-2, degree=degree, margin=margin)
        assert schedule.error <= 1e-2
        s = np.geomspace(lower, 1.0, 20_001)
        rng = np.random.default_rng(0)
        for _ in range(8):
            value = s
            for step in schedule.steps:
                value = step_map(step, value * (1.0 + margin) ** rng.choice([-1.0, 1.0], size=s.shape))
            assert np.abs(value - 1.0).max() <= schedule.error * (1 + 1e-9)

    def test_margin_costs_steps_and_bounds_the_reach(self) -> None:
        plain = margined_schedule(0.02, 1.0, 1e-3, degree=2, margin=0.0)
        margined = margined_schedule(0.02, 1.0, 1e-3, degree=2, margin=0.01)
        assert len(margined.steps) >= len(plain.steps)
        with pytest.raises(ValueError, match="not reached"):
            margined_schedule(0.02, 1.0, 1e-9, degree=1, margin=0.01)


def _case(n: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, RootPlan, torch.Tensor]:
    """Float32 ``Â``, the mtp plan it was normalised for, and an upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "spd":
        A, eps, condition = random_spd(4, n=n, condition=1e3, generator=generator), 0.0, 1e3
    else:
        A, eps, condition = random_covariance(4, n=n, samples=49, generator=generator), 1e-4, None
    plan = plan_root(
        covpool.RootOptions(method="mtp", condition=condition),
        n,
        eps=eps,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    A_hat, _ = normalise(with_relative_ridge(A.float(), eps), plan.normalization)
    return A_hat, plan, torch.randn(A.shape, generator=generator, dtype=torch.float64).float()


class TestMixedRoot:
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_meets_tol_at_condition_1e3(self, fmt: str) -> None:
        A_hat, root_plan, G = _case(64, "spd")
        plan = mixed_plan(root_plan.lower, epsilon=EPSILON[fmt])
        counted: list[emulated_products] = []

        def low() -> emulated_products:
            counted.append(emulated_products(fmt))
            return counted[-1]

        with ProductCounter() as total:
            Y, Z = mixed_sqrt(A_hat, plan, low)
            X = mixed_lyapunov(Y, G, plan, low)
        assert relative_error(Y, reference_root(A_hat)).max() <= 1e-3
        assert relative_error(X, reference_gradient(A_hat, G)).max() <= 1e-3
        assert relative_error(Z, reference_root(A_hat, inverse=True)).max() <= 2e-3
        low_products = sum(mode.products for mode in counted)
        assert (low_products, total.products - low_products) == plan.products()

    def test_refinement_is_what_meets_tol(self) -> None:
        """Without the float32 steps, the same bfloat16 products miss tol by an order of magnitude."""
        A_hat, root_plan, G = _case(64, "spd")
        plan = mixed_plan(root_plan.lower, epsilon=EPSILON["bf16"], refinements=0, backward_refinements=0)
        Y, _ = mixed_sqrt(A_hat, plan, lambda: emulated_products("bf16"))
        X = mixed_lyapunov(Y, G, plan, lambda: emulated_products("bf16"))
        assert relative_error(Y, reference_root(A_hat)).max() > 3e-3
        assert relative_error(X, reference_gradient(A_hat, G)).max() > 3e-3

    def test_exact_products_reach_float32_accuracy(self) -> None:
        """With float32 products the same plan is limited by its schedules, not by rounding."""
        A_hat, root_plan, G = _case(64, "spd")
        plan = mixed_plan(root_plan.lower, epsilon=EPSILON["tf32"])
        Y, _ = mixed_sqrt(A_hat, plan, ProductCounter)
        X = mixed_lyapunov(Y, G, plan, ProductCounter)
        assert relative_error(Y, reference_root(A_hat)).max() <= 1e-5
        assert relative_error(X, reference_gradient(A_hat, G)).max() <= 1e-4


class TestRoundingModel:
    @pytest.mark.parametrize("kind", ["spd", "head"])
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_low_precision_iterations_within_the_model(self, fmt: str, kind: str) -> None:
        """The plan's forward and sign iteration with every product emulated: the forward error within the
        schedule's plus half the residual model at the products' epsilon, the solve's within the schedule's
        plus the Lyapunov model."""
        A_hat, root_plan, G = _case(64, kind)
        n = A_hat.shape[-1]
        plan = mixed_plan(root_plan.lower, epsilon=EPSILON[fmt])
        u = torch.finfo(torch.float32).eps
        with emulated_products(fmt):
            Y, _ = coupled_root(A_hat, plan.forward)
            exact = reference_root(A_hat).float()
            X = solve_lyapunov(exact, G, plan.sign)
        forward_model = plan.forward.error + 0.5 * residual_rounding(
            "mtp", n, u, plan.lower, product_roundoff=EPSILON[fmt]
        )
        solve_model = plan.sign.error + rounding_error(plan.lower, u, product_roundoff=EPSILON[fmt])
        assert relative_error(Y, reference_root(A_hat)).max() <= forward_model
        assert relative_error(X, reference_gradient(A_hat, G)).max() <= solve_model

    @pytest.mark.parametrize("rounding", ROUNDINGS)
    @pytest.mark.parametrize("refinements", [(3, 1), (3, 2)])
    @pytest.mark.parametrize(
        ("kind", "n", "condition"),
        [
            ("spd", 32, 1e4),
            ("ridged", 64, 1e3),
            ("ridged", 32, 1e4),
            ("clustered", 48, 1e4),
            ("clustered", 96, 1e2),
        ],
    )
    def test_tf32_plans_within_the_fitted_model(
        self, kind: str, n: int, condition: float, refinements: tuple[int, int], rounding: str
    ) -> None:
        """Fresh seeds and sizes the model was not fitted on, up to the edge of its range (condition 1e4),
        under every rounding of the TF32 operands: forward, inverse, gradient and a valid input's residual
        within the model."""
        A_hat, lower, G = _bounded_case(kind, n, condition, seed=7)
        plan = mixed_plan(
            lower,
            epsilon=EPSILON["tf32"],
            refinements=refinements[0],
            backward_refinements=refinements[1],
        )
        low = lambda: emulated_products("tf32", rounding)  # noqa: E731
        Y, Z = mixed_sqrt(A_hat, plan, low)
        X = mixed_lyapunov(Y, G, plan, low)
        forward, gradient = mixed_error_bound(plan, n)
        assert forward < 1e-3 and gradient < 1e-3  # the model covers this range
        assert relative_error(Y, reference_root(A_hat)).max() <= forward
        assert relative_error(Z, reference_root(A_hat, inverse=True)).max() <= forward
        assert relative_error(X, reference_gradient(A_hat, G)).max() <= gradient
        assert mixed_residual(A_hat, Y, Z).max() <= mixed_valid_residual(plan, n)

    def test_the_model_covers_only_what_was_fitted(self) -> None:
        """Two refinements (the default before the fit ran every rounding of the operands), no correction,
        bfloat16 products, a spectrum beyond condition 1e4 or n > 512: no certificate."""
        lower = 0.025
        assert mixed_plan(lower, epsilon=EPSILON["tf32"]).refinements == CERTIFIED_REFINEMENTS == 3
        assert math.isfinite(mixed_error_bound(mixed_plan(lower, epsilon=EPSILON["tf32"]), 64)[0])
        for plan, n in (
            (mixed_plan(lower, epsilon=EPSILON["tf32"], refinements=2), 64),
            (mixed_plan(lower, epsilon=EPSILON["tf32"], backward_refinements=0), 64),
            (mixed_plan(lower, epsilon=EPSILON["bf16"]), 64),
            (mixed_plan(EPSILON["tf32"] / (TF32_DOMAIN * 1.01), epsilon=EPSILON["tf32"]), 64),
            (mixed_plan(lower, epsilon=EPSILON["tf32"]), 1024),
        ):
            assert mixed_error_bound(plan, n) == (math.inf, math.inf)
            assert mixed_valid_residual(plan, n) == math.inf

    def test_two_refinements_under_truncation_exceed_the_room(self) -> None:
        """Why the certificate takes three refinements: a user-ridged input at condition 1e4 (half its
        eigenvalues at the ridge), TF32 operands truncated: with two refinements the valid input's test
        value comes within 2x of its model (and to nearest it does not); a third brings it back."""
        A_hat, lower, _ = _bounded_case("ridged", 32, 1e4, seed=1)
        values = {}
        for rounding, refinements in itertools.product(("nearest-even", "truncation"), (2, 3)):
            plan = mixed_plan(lower, epsilon=EPSILON["tf32"], refinements=refinements)
            Y, Z = mixed_sqrt(A_hat, plan, lambda: emulated_products("tf32", rounding))  # noqa: B023
            t = plan.epsilon / plan.lower
            values[rounding, refinements] = mixed_residual(A_hat, Y, Z).max().item() / (
                VALID_RESIDUAL_GROWTH * t * t
            )
        assert values["truncation", 2] > 0.5 > values["nearest-even", 2]
        assert values["truncation", 3] < 0.5 and values["nearest-even", 3] < 0.5

    @pytest.mark.parametrize("rounding", ROUNDINGS)
    def test_beyond_the_fitted_range_tf32_fails(self, rounding: str) -> None:
        """Why the range ends: at condition 1e5 the same plan, designed for it, misses the default tol 1e-3
        under every rounding (2.5e-3 … 7e-3 here; NaN or up to 5e-2 on other inputs of the fit)."""
        A_hat, lower, G = _bounded_case("ridged", 64, 1e5, seed=1)
        plan = mixed_plan(lower, epsilon=EPSILON["tf32"])
        low = lambda: emulated_products("tf32", rounding)  # noqa: E731
        Y, _ = mixed_sqrt(A_hat, plan, low)
        error = relative_error(mixed_lyapunov(Y, G, plan, low), reference_gradient(A_hat, G))
        assert not (error.nan_to_num(nan=1.0).max() <= 1e-3)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_the_model_certifies_nothing_at_the_heads_ridge(self, fmt: str) -> None:
        """κ ≈ 6e5: beyond the fitted range, and indeed the mixed gradient misses tol (or is NaN)."""
        A_hat, root_plan, G = _case(64, "head")
        plan = mixed_plan(root_plan.lower, epsilon=EPSILON[fmt])
        assert mixed_error_bound(plan, A_hat.shape[-1]) == (math.inf, math.inf)
        low = lambda: emulated_products(fmt)  # noqa: E731
        Y, _ = mixed_sqrt(A_hat, plan, low)
        error = relative_error(mixed_lyapunov(Y, G, plan, low), reference_gradient(A_hat, G))
        assert not (error.max() <= 1e-3)  # NaN in bfloat16

    def test_product_roundoff_only_raises_the_models(self) -> None:
        u = torch.finfo(torch.float32).eps
        assert residual_rounding("mtp", 64, u, 0.1, product_roundoff=u / 2) == residual_rounding(
            "mtp", 64, u, 0.1
        )
        assert rounding_error(0.1, u, product_roundoff=EPSILON["bf16"]) == rounding_error(
            0.1, EPSILON["bf16"]
        )


def _root_case(kind: str, n: int, condition: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``A`` (4 :func:`covpool.testing.bounded_matrices`) and an upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    A = bounded_matrices(kind, 4, n, condition, generator)
    return A.float(), torch.randn(A.shape, generator=generator, dtype=torch.float64).float()


def _bounded_case(kind: str, n: int, condition: float, seed: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """:func:`_root_case` normalised as the float32 mtp plan assuming ``condition`` normalises it (the
    input of ``examples/studies/tf32_fit.py``), that plan's ``lower``, and the upstream gradient."""
    A, G = _root_case(kind, n, condition, seed)
    # the plan's bound and normalisation do not depend on tol; 1e-2 keeps the plan at condition 1e5
    plan = plan_root(
        covpool.RootOptions(method="mtp", condition=condition, tol=1e-2),
        n,
        eps=0.0,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    return normalise(A, plan.normalization)[0], plan.lower, G


TF32 = covpool.RootOptions(method="mtp", precision="tf32")


class TestTF32Plan:
    """``RootOptions(precision="tf32")`` through :func:`covpool.sqrtm` / :func:`covpool.inv_sqrtm`, its TF32
    products emulated on CPU."""

    @pytest.mark.parametrize("kind", ["spd", "ridged"])
    @pytest.mark.parametrize("name", ["sqrtm", "inv_sqrtm"])
    def test_root_and_gradient_within_tol(self, name: str, kind: str) -> None:
        inverse = name == "inv_sqrtm"
        A, G = _root_case(kind, 40, 1e3)
        A.requires_grad_(True)
        out = getattr(covpool, name)(A, TF32)
        out.backward(G)
        A64 = A.detach().double()
        assert relative_error(out, reference_root(A64, inverse=inverse)).max() <= 1e-3
        assert relative_error(A.grad, reference_gradient(A64, G.double(), inverse=inverse)).max() <= 1e-3

    def test_low_and_full_products_as_planned(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Forward and backward run the plan's TF32 products (emulated) and its float32 ones, plus the
        normalisation's two and the a-posteriori test's eight float32 products."""
        from covpool.linalg import precision

        phases: list[ProductCounter] = []

        def counted(fmt: str) -> ProductCounter:
            phases.append(emulated_products(fmt))
            return phases[-1]

        monkeypatch.setattr(precision, "emulated_products", counted)
        A, G = _root_case("spd", 24, 1e3)
        A.requires_grad_(True)
        plan = plan_root(TF32, 24, eps=0.0, device=torch.device("cpu"), dtype=torch.float32)
        with ProductCounter() as total:
            covpool.sqrtm(A, TF32).backward(G)
        low = sum(phase.products for phase in phases)
        assert (low, total.products - low) == (plan.mixed.products()[0], plan.mixed.products()[1] + 2 + 8)

    def test_beyond_the_bound_flagged_not_wrong(self) -> None:
        """User-ridged covariances at κ = 1e5 where 1e3 is assumed: with the host checks a ValueError that
        says what to pass; without, each matrix is NaN or within tol (forward and gradient)."""
        A, G = _root_case("ridged", 32, 1e5, seed=2)
        with pytest.raises(
            ValueError, match=r"condition=1000 is assumed.*Y² = Â \(precision='tf32'\).*Pass eps="
        ):
            covpool.sqrtm(A, TF32)
        A.requires_grad_(True)
        out = covpool.sqrtm(A, covpool.RootOptions(method="mtp", precision="tf32", check_input=False))
        out.backward(G)
        flagged = out.isnan().flatten(-2).all(-1)
        assert flagged.any()
        A64 = A.detach().double()
        forward = relative_error(out, reference_root(A64))[~flagged]
        gradient = relative_error(A.grad, reference_gradient(A64, G.double()))[~flagged]
        assert (forward <= 1e-3).all() and (gradient <= 1e-3).all()

    @pytest.mark.parametrize(
        ("options", "dtype", "n", "message"),
        [
            (dict(), torch.float64, 32, "works in float64"),
            (dict(steps=3), torch.float32, 32, "steps given"),
            (dict(backward="unrolled"), torch.float32, 32, "backward given"),
            (dict(fused=True), torch.float32, 32, "fused=True given"),
            (dict(condition=1e5), torch.float32, 32, "outside what its model was fitted on"),
            (dict(), torch.float32, 1024, "n=1024 lies outside"),
            (dict(tol=1e-5), torch.float32, 32, r"models give forward .*precision='full', a larger tol"),
        ],
    )
    def test_refused_with_what_to_change(
        self, options: dict, dtype: torch.dtype, n: int, message: str
    ) -> None:
        with pytest.raises(ValueError, match=rf"precision='tf32' cannot be planned .*{message}"):
            plan_root(
                covpool.RootOptions(method="mtp", precision="tf32", **options),
                n,
                eps=0.0,
                device=torch.device("cpu"),
                dtype=dtype,
            )

    def test_batch_shapes_and_degenerate_input(self) -> None:
        """Leading batch dimensions, n = 1, an empty batch, the zero matrix (its square root is exact; its
        inverse root is flagged), NaN flagged per matrix, and scales 1e-30 … 1e30 finite and right."""
        options = covpool.RootOptions(method="mtp", precision="tf32", check_input=False)
        A = random_spd(2, 3, n=8, dtype=torch.float32)
        assert covpool.sqrtm(A, options).shape == (2, 3, 8, 8)
        assert torch.equal(covpool.sqrtm(torch.tensor([[[4.0]]]), options), torch.tensor([[[2.0]]]))
        assert covpool.sqrtm(torch.empty(0, 8, 8), options).shape == (0, 8, 8)
        mixed = torch.stack([torch.zeros(8, 8), A[0, 0], 1e-30 * A[0, 1], 1e30 * A[0, 2]])
        mixed[1, 0, 0] = float("nan")
        out = covpool.sqrtm(mixed, options)
        assert torch.equal(out[0], torch.zeros(8, 8))
        assert out[1].isnan().all() and out[2:].isfinite().all()
        for scale, matrix, root in ((1e-30, A[0, 1], out[2]), (1e30, A[0, 2], out[3])):
            assert relative_error(root / scale**0.5, reference_root(matrix.double())) <= 1e-3
        assert covpool.inv_sqrtm(torch.zeros(1, 8, 8), options).isnan().all()

    def test_a_covariance_head_ridge_is_refused(self) -> None:
        head = covpool.layers.CovPoolHead(64, num_classes=3, root=TF32)
        with pytest.raises(ValueError, match="precision='tf32' cannot be planned"):
            head(torch.randn(2, 64, 7, 7))

    @pytest.mark.parametrize("method", ["mpa", "ns", "eigh"])
    def test_other_methods_take_full_precision_only(self, method: str) -> None:
        with pytest.raises(ValueError, match=rf"method='{method}' runs at precision='full' only"):
            covpool.RootOptions(method=method, precision="tf32")

    @pytest.mark.parametrize(
        ("device", "dtype", "n", "condition", "expected"),
        [
            ("cuda", torch.float32, 512, None, "tf32"),
            ("cuda", torch.float32, 64, None, "full"),  # TF32 products barely faster there
            ("cuda", torch.float32, 256, None, "full"),  # modelled times tie, the tests' products included
            ("cuda", torch.float32, 512, 1e4, "full"),  # TF32 not certified there, float32 is
            ("cuda", torch.float32, 512, 1e2, "full"),  # float32's short plan beats three refinements
            ("cuda", torch.float64, 512, None, "full"),
            ("cpu", torch.float32, 512, None, "full"),
        ],
    )
    def test_auto_takes_tf32_where_certified_and_modelled_faster(
        self, device: str, dtype: torch.dtype, n: int, condition: float | None, expected: str
    ) -> None:
        from covpool.linalg.planner import modelled_time

        options = covpool.RootOptions(method="mtp", precision="auto", condition=condition)
        plan = plan_root(options, n, eps=0.0, device=torch.device(device), dtype=dtype)
        assert plan.precision == expected and (plan.mixed is not None) == (expected == "tf32")
        full = plan_root(
            covpool.RootOptions(method="mtp", condition=condition),
            n,
            eps=0.0,
            device=torch.device(device),
            dtype=dtype,
        )
        if expected == "tf32":
            low, high = plan.mixed.products()
            assert modelled_time(low, high + 8, n) < full.products() + 3

    def test_auto_method_on_cpu_takes_eigh_at_full_precision(self) -> None:
        plan = plan_root(
            covpool.RootOptions(precision="tf32"),
            64,
            eps=0.0,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        assert (plan.method, plan.precision) == ("eigh", "full")

    def test_traced_becomes_the_opaque_root(self) -> None:
        """torch.compile cannot scope TF32 around its own products: the root enters the graph as
        ``covpool::root``, which runs the eager mixed root."""
        A, _ = _root_case("spd", 16, 1e3)
        torch._dynamo.reset()
        compiled = torch.compile(lambda X: covpool.sqrtm(X, TF32), backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(A), covpool.sqrtm(A, TF32))
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def recorded() -> dict:
    """The recorded results of ``python examples/studies/tf32_fit.py``."""
    path = Path(__file__).resolve().parents[1] / "examples" / "results" / "tf32_fit.json"
    return json.loads(path.read_text())


class TestRecordedFit:
    """The recorded fit (``python examples/studies/tf32_fit.py``, ``examples/results/tf32_fit.json``) holds
    the constants of :func:`mixed_error_bound` and :func:`mixed_valid_residual` with at least 2x room under
    every rounding of the TF32 operands the hardware may use, on every plan the certificate covers."""

    def test_every_rounding_and_the_whole_range_were_run(self, recorded: dict) -> None:
        rows = recorded["rows"]
        assert {row["rounding"] for row in rows} == set(ROUNDINGS)
        certified = [row for row in rows if row["fitted"] and row["certified"]]
        for rounding in ROUNDINGS:
            chosen = [row for row in certified if row["rounding"] == rounding]
            assert max(row["n"] for row in chosen) == MAX_FITTED_SIZE
            assert max(row["t"] for row in chosen) > 0.9 * TF32_DOMAIN
            assert {row["plan"] for row in chosen} >= {f"{CERTIFIED_REFINEMENTS}/1"}
        assert all(int(row["plan"].split("/")[0]) >= CERTIFIED_REFINEMENTS for row in certified)

    @pytest.mark.parametrize("rounding", ROUNDINGS)
    def test_each_constant_keeps_twice_the_largest_ratio(self, recorded: dict, rounding: str) -> None:
        chosen = [
            row
            for row in recorded["rows"]
            if row["fitted"] and row["certified"] and row["rounding"] == rounding
        ]
        model = {
            "root/t": ROOT_GROWTH,
            "inverse/t²": INVERSE_GROWTH,
            "gradient/t²": INVERSE_GROWTH,
            "residual/t²": VALID_RESIDUAL_GROWTH,
        }
        for ratio, constant in model.items():
            worst = max(row[ratio] for row in chosen)
            assert constant >= 2.0 * worst, (rounding, ratio, worst, constant)
