"""Mixed-precision square root and its Lyapunov backward: low-precision bulk, float32 refinement.

Not wired into :func:`covpool.sqrtm`: the roots' default stays full float32 products until a mixed plan is
certified on a GPU (issue #18). This module is what such a plan runs:

- **forward**: the coupled iteration (:func:`covpool.linalg.iteration.coupled_root`) with a *margined*
  schedule (:func:`margined_schedule`) and every product in low precision (TF32 or bfloat16), then
  ``refinements`` Newton steps for ``Y² = Â`` that re-inject ``Â``: the residual ``R = Â - Y²`` in float32,
  the correction ``E`` from ``Y E + E Y = R`` by the sign iteration in low precision, ``Y ← Y + E``
  (Newton's method with an inexact inner solve: the error goes from ``δ`` to about ``δ (ρ + δ)``, ``ρ`` the
  solve's relative error). ``Z`` follows by one float32 Newton-Schulz step ``Z ← Z + Z (I - Y Z)`` per
  refinement. The coupled iteration alone cannot re-inject ``Â``: every pair with ``Z Y = I`` is one of its
  fixed points, so the low-precision drift of ``Y`` stays (Higham 1997 calls it stable, not
  self-correcting); the uncoupled Newton step ``Y ← Y + ½ sym(Z (Â - Y²))`` (Higham 1986) replaces
  ``R_ij / (y_i + y_j)`` by ``R_ij (1/y_i + 1/y_j) / 4``, off by up to ``√κ / 4`` between distant
  eigenvalues, so it amplifies a generic low-precision error instead of removing it.
- **backward**: iterative refinement of ``Y X + X Y = G``: ``X`` from the low-precision sign iteration,
  then ``backward_refinements`` times the float32 residual ``G - (Y X + X Y)`` (one product: ``Y X`` and its
  transpose) and a low-precision correction.

Margins, after Polar Express (Amsel et al. 2025), which evaluates each polynomial at ``x / 1.01``: every
low-precision step is designed on ``[a / (1 + m), b (1 + m)]`` for the interval ``[a, b]`` it receives,
and passes on its image of that wider interval, so an eigenvalue that rounding moves by a relative ``m``
before any step still lands where the next step was designed for (both ends: the lower end is cushioned as
the upper one).

The precision of the low phases is a hook, a callable returning a context manager: on CPU
``lambda: emulated_products("bf16")`` (:mod:`covpool.linalg.emulation`); on CUDA, one that sets torch's
float32 matmul precision for its duration. The float32 phases run outside it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from covpool.linalg.coefficients import minimax_odd_polynomial
from covpool.linalg.emulation import EPSILON
from covpool.linalg.iteration import coupled_root, residual_rounding
from covpool.linalg.lyapunov import (
    SignFactor,
    _operator_step,
    _rhs_step,
    apply_sign_factor,
    rounding_error,
    sign_factor,
)
from covpool.linalg.numerics import eye_like, symmetrize
from covpool.linalg.options import RootPlan
from covpool.linalg.schedule import MAX_STEPS, PolynomialStep, Schedule, image

MARGIN = 0.01
"""Relative room on both ends of every low-precision step (Polar Express's 1.01)."""
FLOAT32_EPSILON = torch.finfo(torch.float32).eps
"""Machine epsilon of the float32 phases (the rounding models' convention)."""

ProductHook = Callable[[], AbstractContextManager[object]]
"""A callable returning a context manager inside which the matrix products run in low precision."""


def full_precision() -> AbstractContextManager[object]:
    """The hook of products in the working dtype's own precision (nothing changed)."""
    return contextlib.nullcontext()


@functools.cache
def margined_schedule(
    lower: float, upper: float, tol: float, *, degree: int, margin: float = MARGIN
) -> Schedule:
    """Minimax steps of ``degree`` from ``[lower, upper]`` to within ``tol`` of 1, each designed on its
    interval widened by the factor ``1 + margin`` at both ends (the interval passed on is its image of the
    widened one). The sign iteration takes degrees 1 and 2.

    Raises:
        ValueError: ``tol`` not reached in :data:`covpool.linalg.schedule.MAX_STEPS` steps (the margin
            bounds how close to 1 a step can map its widened interval).
    """
    a, b, steps = lower, upper, []
    for _ in range(MAX_STEPS):
        design = (a / (1.0 + margin), b * (1.0 + margin))
        coefficients, _ = minimax_odd_polynomial(*design, degree)
        step = PolynomialStep(coefficients)
        a, b = image(step, *design)
        steps.append(step)
        if max(1.0 - a, b - 1.0) <= tol:
            return Schedule(tuple(steps), lower, upper, max(1.0 - a, b - 1.0))
    raise ValueError(
        f"tol={tol:g} is not reached with margin={margin:g} in {MAX_STEPS} steps of degree {degree}"
    )


@dataclass(frozen=True)
class MixedPlan:
    """What :func:`mixed_sqrt` and :func:`mixed_lyapunov` run.

    Attributes:
        lower: lower end of the spectrum of ``Â^(1/2)`` (the float32 plan's).
        epsilon: machine epsilon of the low-precision products.
        forward: margined schedule of the low-precision coupled iteration.
        sign: margined schedule of the low-precision sign iteration (forward corrections and backward), on
            the spectrum of ``Â^(1/2)``.
        refinements: float32 Newton refinements of the forward.
        backward_refinements: float32 residual corrections of the Lyapunov solve.
    """

    lower: float
    epsilon: float
    forward: Schedule
    sign: Schedule
    refinements: int
    backward_refinements: int

    def products(self) -> tuple[int, int]:
        """``(low, float32)`` matrix products of forward and backward, the backward given the forward's
        :func:`covpool.linalg.lyapunov.sign_factor`: the factor takes 3 products a step of degree 2 (2 of
        degree 1), each solve with it 4 (3); each forward refinement takes one float32 product for ``R``, a
        solve and two float32 products for ``Z``; the backward a solve, and one float32 product and a solve
        per correction."""
        factor = sum(3 if step.degree == 2 else 2 for step in self.sign.steps)
        solve = sum(4 if step.degree == 2 else 3 for step in self.sign.steps)
        solves = self.refinements + 1 + self.backward_refinements
        return (
            self.forward.forward_products() + factor + solves * solve,
            3 * self.refinements + self.backward_refinements,
        )


def mixed_plan(
    plan: RootPlan,
    *,
    epsilon: float,
    refinements: int | None = None,
    backward_refinements: int | None = None,
    margin: float = MARGIN,
) -> MixedPlan:
    """The mixed version of an mtp ``plan`` (its normalisation and spectrum bound ``[plan.lower, 1]``) with
    products of machine ``epsilon`` (:data:`covpool.linalg.emulation.EPSILON`).

    Both low-precision schedules stop at ``tol = 2 epsilon``: closer to 1 than the products' rounding they
    would only spend products. The upper end is 1: the float32 plan's room above it for the rounding of
    the normalisation (1e-4) is within the margin. The sign iteration's lower end leaves the forward's
    ``2 epsilon`` below the bound.

    ``refinements`` and ``backward_refinements`` default to the cheapest counts that met ``tol = 1e-3``
    with ten times room at condition 1e3 in ``python -m covpool.bench --mixed``: one each for TF32, two
    each for bfloat16 (one each leaves bfloat16's gradient at up to 1e-3, two and one at 3e-4).

    Raises:
        ValueError: ``plan`` is not an mtp plan (its normalised input is what the mixed root takes).
    """
    if plan.method != "mtp":
        raise ValueError(f"mixed plans are made from mtp plans, got method={plan.method!r}")
    target = 2.0 * epsilon
    lower = plan.lower
    default = 1 if epsilon <= EPSILON["tf32"] else 2
    refinements = default if refinements is None else refinements
    backward_refinements = default if backward_refinements is None else backward_refinements
    return MixedPlan(
        lower,
        epsilon,
        margined_schedule(lower, 1.0, target, degree=2, margin=margin),
        margined_schedule(lower * (1.0 - target), 1.0, target, degree=2, margin=margin),
        refinements,
        backward_refinements,
    )


def mixed_sqrt(
    A_hat: torch.Tensor, plan: MixedPlan, low: ProductHook
) -> tuple[torch.Tensor, torch.Tensor, SignFactor]:
    """``(Y, Z) ≈ (Â^(1/2), Â^(-1/2))``: the plan's low-precision coupled iteration, then its float32
    refinements, and the sign factor of the low-precision ``Y`` that every refinement solved with (pass it
    to :func:`mixed_lyapunov`; it is ``3 · steps`` matrices, where the float32 backward keeps ``Y`` alone).

    The corrections solve with the operator of the low-precision ``Y``, not of the refined one: classic
    iterative refinement (factor once in low precision, residuals in high precision); the operator's error,
    about the low-precision forward's, adds to the contraction factor of each refinement. Shapes:
    ``(*, n, n)`` each, float32.
    """
    shape = A_hat.shape
    A_hat = A_hat.reshape(-1, shape[-2], shape[-1])
    with low():
        Y, Z = coupled_root(A_hat, plan.forward)
        Y = symmetrize(Y)
        factor = sign_factor(Y, plan.sign)
    for _ in range(plan.refinements):
        R = torch.baddbmm(A_hat, Y, Y, alpha=-1.0)
        with low():
            E = apply_sign_factor(factor, R, plan.sign)
        Y = Y + symmetrize(E)
        Z = torch.baddbmm(Z, Z, torch.baddbmm(eye_like(Y), Y, Z, alpha=-1.0))
    return Y.reshape(shape), symmetrize(Z).reshape(shape), factor


def mixed_lyapunov(
    Y: torch.Tensor, G: torch.Tensor, plan: MixedPlan, low: ProductHook, factor: SignFactor | None = None
) -> torch.Tensor:
    """``X`` with ``Y X + X Y = sym(G)``: the low-precision sign iteration with ``factor`` (that of ``Y``
    when not given) and the plan's float32 residual corrections with ``Y``. Shapes: ``(*, n, n)`` each."""
    shape = Y.shape
    Y = Y.reshape(-1, shape[-2], shape[-1])
    G = symmetrize(G.reshape(-1, shape[-2], shape[-1]))
    with low():
        factor = sign_factor(Y, plan.sign) if factor is None else factor
        X = symmetrize(apply_sign_factor(factor, G, plan.sign))
    for _ in range(plan.backward_refinements):
        YX = Y @ X
        with low():
            X = X + symmetrize(apply_sign_factor(factor, G - YX - YX.mT, plan.sign))
    return X.reshape(shape)


def mixed_error_bound(plan: MixedPlan, n: int) -> tuple[float, float]:
    """Modelled ``(forward, gradient)`` relative errors of a mixed plan on ``n × n`` input whose ``Â^(1/2)``
    has its spectrum in ``[plan.lower, 1]``.

    The low-precision forward ends within ``plan.forward.error`` of the root plus half its rounding
    residual (:func:`covpool.linalg.iteration.residual_rounding` at the products' ``epsilon``: an eigenvalue
    ``u`` of ``Z Y`` puts ``|u - 1| / 2`` on ``Y``). A sign solve has relative error
    ``ρ = plan.sign.error + rounding_error`` at the products' ``epsilon``; a refinement takes ``δ`` to
    ``δ (ρ + δ)`` plus float32's floor, the float32 residual's rounding through ``Y⁻¹``
    (``residual_rounding`` at float32's); ``ρ`` grows by the low-precision forward's error, the operator's
    (:func:`mixed_sqrt`). The gradient's corrections take ``ε`` to ``ρ ε`` plus
    float32's Lyapunov floor, and the forward's error enters it once. Where ``ρ`` or the low-precision
    forward's error reaches 1 the model certifies no convergence and returns ``inf``.
    """
    lower, epsilon = plan.lower, plan.epsilon
    rho = plan.sign.error + rounding_error(lower, FLOAT32_EPSILON, product_roundoff=epsilon)
    floor = residual_rounding("mtp", n, FLOAT32_EPSILON, lower)
    forward = plan.forward.error + 0.5 * residual_rounding(
        "mtp", n, FLOAT32_EPSILON, lower, product_roundoff=epsilon
    )
    rho = rho + forward  # every solve uses the operator of the low-precision Y
    if rho >= 1.0 or forward >= 1.0:
        return math.inf, math.inf
    for _ in range(plan.refinements):
        forward = forward * (rho + forward) + floor
    gradient = rho
    for _ in range(plan.backward_refinements):
        gradient = gradient * rho + rounding_error(lower, FLOAT32_EPSILON)
    return forward, gradient + forward


def staged_root(
    A_hat: torch.Tensor, schedule: Schedule, low_steps: int, low: ProductHook
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupled iteration of ``schedule`` with its first ``low_steps`` steps in low precision and the
    rest in float32 (which finish the iteration but do not re-inject ``Â``). Shapes: ``(*, n, n)`` each."""
    if low_steps == 0:
        return coupled_root(A_hat, schedule)
    head = Schedule(schedule.steps[:low_steps], schedule.lower, schedule.upper, schedule.error)
    tail = Schedule(schedule.steps[low_steps:], schedule.lower, schedule.upper, schedule.error)
    with low():
        Y, Z = coupled_root(A_hat, head)
    return coupled_root(A_hat, tail, start=(Y, Z))


def staged_lyapunov(
    Y: torch.Tensor, G: torch.Tensor, schedule: Schedule, low_steps: int, low: ProductHook
) -> torch.Tensor:
    """``X`` with ``Y X + X Y = sym(G)`` by the sign iteration of ``schedule``, its first ``low_steps`` steps
    in low precision and the rest in float32. Shapes: ``(*, n, n)`` each."""
    shape = Y.shape
    B = Y.reshape(-1, shape[-2], shape[-1])
    C = symmetrize(G.reshape(-1, shape[-2], shape[-1]))
    last = len(schedule.steps) - 1
    for k, step in enumerate(schedule.steps):
        with low() if k < low_steps else contextlib.nullcontext():
            B2, T, B_next = _operator_step(B, step.coefficients)
            B, C = B_next, _rhs_step(B, B2, T, C, step.coefficients, 0.5 if k == last else 1.0)
    return C.reshape(shape)
