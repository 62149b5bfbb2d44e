"""The mixed-precision root (:mod:`covpool.linalg.mixed`) on emulated TF32/bfloat16 products against float64,
and the rounding models at the products' precision against the emulated runs (issue #18)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import covpool
from covpool.linalg.emulation import EPSILON, ProductCounter, emulated_products
from covpool.linalg.iteration import coupled_root, residual_rounding
from covpool.linalg.lyapunov import rounding_error, solve_lyapunov
from covpool.linalg.mixed import (
    margined_schedule,
    mixed_error_bound,
    mixed_lyapunov,
    mixed_plan,
    mixed_sqrt,
)
from covpool.linalg.normalization import normalise
from covpool.linalg.numerics import with_relative_ridge
from covpool.linalg.options import RootPlan
from covpool.linalg.schedule import step_map
from covpool.testing import random_covariance, random_spd, reference_gradient, reference_root, relative_error

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

    def test_made_from_mtp_plans_only(self) -> None:
        plan = covpool.RootOptions(method="mpa").plan(
            8, eps=0.0, device=torch.device("cpu"), dtype=torch.float32
        )
        with pytest.raises(ValueError, match="mtp"):
            mixed_plan(plan, epsilon=EPSILON["tf32"])

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
    plan = covpool.RootOptions(method="mtp", condition=condition).plan(
        n, eps=eps, device=torch.device("cpu"), dtype=torch.float32
    )
    A_hat, _ = normalise(with_relative_ridge(A.float(), eps), plan.normalization)
    return A_hat, plan, torch.randn(A.shape, generator=generator, dtype=torch.float64).float()


class TestMixedRoot:
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_meets_tol_at_condition_1e3(self, fmt: str) -> None:
        A_hat, root_plan, G = _case(64, "spd")
        plan = mixed_plan(root_plan, epsilon=EPSILON[fmt])
        counted: list[emulated_products] = []

        def low() -> emulated_products:
            counted.append(emulated_products(fmt))
            return counted[-1]

        with ProductCounter() as total:
            Y, Z, factor = mixed_sqrt(A_hat, plan, low)
            X = mixed_lyapunov(Y, G, plan, low, factor)
        assert relative_error(Y, reference_root(A_hat)).max() <= 1e-3
        assert relative_error(X, reference_gradient(A_hat, G)).max() <= 1e-3
        assert relative_error(Z, reference_root(A_hat, inverse=True)).max() <= 2e-3
        low_products = sum(mode.products for mode in counted)
        assert (low_products, total.products - low_products) == plan.products()

    def test_refinement_is_what_meets_tol(self) -> None:
        """Without the float32 steps, the same bfloat16 products miss tol by an order of magnitude."""
        A_hat, root_plan, G = _case(64, "spd")
        plan = mixed_plan(root_plan, epsilon=EPSILON["bf16"], refinements=0, backward_refinements=0)
        Y, _, factor = mixed_sqrt(A_hat, plan, lambda: emulated_products("bf16"))
        X = mixed_lyapunov(Y, G, plan, lambda: emulated_products("bf16"), factor)
        assert relative_error(Y, reference_root(A_hat)).max() > 3e-3
        assert relative_error(X, reference_gradient(A_hat, G)).max() > 3e-3

    def test_exact_products_reach_float32_accuracy(self) -> None:
        """With float32 products the same plan is limited by its schedules, not by rounding."""
        A_hat, root_plan, G = _case(64, "spd")
        plan = mixed_plan(root_plan, epsilon=EPSILON["tf32"])
        Y, _, factor = mixed_sqrt(A_hat, plan, ProductCounter)
        X = mixed_lyapunov(Y, G, plan, ProductCounter, factor)
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
        plan = mixed_plan(root_plan, epsilon=EPSILON[fmt])
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

    @pytest.mark.parametrize("refinements", [(1, 1), (2, 1), (2, 2)])
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_mixed_plans_within_the_model(self, fmt: str, refinements: tuple[int, int]) -> None:
        """Condition 1e3, n = 64: the measured errors within the model."""
        A_hat, root_plan, G = _case(64, "spd", seed=1)
        plan = mixed_plan(
            root_plan, epsilon=EPSILON[fmt], refinements=refinements[0], backward_refinements=refinements[1]
        )
        low = lambda: emulated_products(fmt)  # noqa: E731
        Y, _, factor = mixed_sqrt(A_hat, plan, low)
        X = mixed_lyapunov(Y, G, plan, low, factor)
        forward, gradient = mixed_error_bound(plan, A_hat.shape[-1])
        assert relative_error(Y, reference_root(A_hat)).max() <= forward
        assert relative_error(X, reference_gradient(A_hat, G)).max() <= gradient
        if fmt == "tf32":  # the model converges (bfloat16's is above 1 at the gradient: certifies nothing)
            assert max(forward, gradient) < 0.05

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_the_model_certifies_nothing_at_the_heads_ridge(self, fmt: str) -> None:
        """κ ≈ 6e5: a low-precision solve's modelled error is above 1, and indeed the mixed gradient
        misses tol."""
        A_hat, root_plan, G = _case(64, "head")
        plan = mixed_plan(root_plan, epsilon=EPSILON[fmt])
        assert mixed_error_bound(plan, A_hat.shape[-1]) == (math.inf, math.inf)
        low = lambda: emulated_products(fmt)  # noqa: E731
        Y, _, factor = mixed_sqrt(A_hat, plan, low)
        assert (
            relative_error(mixed_lyapunov(Y, G, plan, low, factor), reference_gradient(A_hat, G)).max() > 1e-3
        )

    def test_product_roundoff_only_raises_the_models(self) -> None:
        u = torch.finfo(torch.float32).eps
        assert residual_rounding("mtp", 64, u, 0.1, product_roundoff=u / 2) == residual_rounding(
            "mtp", 64, u, 0.1
        )
        assert rounding_error(0.1, u, product_roundoff=EPSILON["bf16"]) == rounding_error(
            0.1, EPSILON["bf16"]
        )
