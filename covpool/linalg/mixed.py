"""Mixed-precision square root and its Lyapunov backward: low-precision bulk, float32 refinement.

What :func:`covpool.sqrtm` runs for a plan with ``precision="tf32"`` (:class:`covpool.RootOptions`), and
the study behind it (``python examples/studies/mixed.py``, bfloat16 included; recorded in
``examples/results/mixed.json``):

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
- **backward**: iterative refinement of ``Y X + X Y = G``: ``X`` from the low-precision sign iteration
  with the refined ``Y``, then ``backward_refinements`` times the float32 residual ``G - (Y X + X Y)`` (one
  product: ``Y X`` and its transpose) and a low-precision correction.
- **a-posteriori test** (:func:`covpool.linalg.iteration.mixed_residual`): the refinement of ``Z`` makes
  it the inverse of ``Y`` whether or not ``Y² = Â``, so ``Z Y - I`` alone would pass a wrong ``Y``. The test
  also takes the float32 residual ``Z (Â - Y²) Z``, whose eigenvalues are about twice the relative errors
  of the eigenvalues of ``Y``, unweighted, so it sees an error in the smallest ones, which govern the
  gradient.

Margins, after Polar Express (Amsel et al. 2025), which evaluates each polynomial at ``x / 1.01``: every
low-precision step is designed on ``[a / (1 + m), b (1 + m)]`` for the interval ``[a, b]`` it receives,
and passes on its image of that wider interval, so an eigenvalue that rounding moves by a relative ``m``
before any step still lands where the next step was designed for (both ends: the lower end is cushioned as
the upper one).

The precision of the low phases is a hook, a callable returning a context manager: the roots take
:func:`covpool.linalg.precision.tf32_products` (TF32 on CUDA, emulated elsewhere); the study
``lambda: emulated_products("bf16")`` (:mod:`covpool.linalg.emulation`). The float32 phases run outside it.

**The certificate** (:func:`mixed_error_bound`) is measured, not derived: the general rounding models at
the products' epsilon (:func:`covpool.linalg.iteration.residual_rounding`,
:func:`covpool.linalg.lyapunov.rounding_error`) hold on every emulated run but are worst cases in ``n``
and ``κ``: at condition 1e3 and n = 64 they put TF32's forward at 0.04 and a TF32 sign solve at 0.07,
more than twenty times what every-product-TF32 runs measure (the ``all`` rows in TF32 of
``python examples/studies/mixed.py``, recorded in ``examples/results/mixed.json``), so composed over the
refinements they certify nothing useful. The errors are instead modelled in ``t = ε / lower`` (``ε`` the
products' machine epsilon, ``lower`` the plan's bound on the smallest eigenvalue of ``Â^(1/2)``: the
relative size of a product's rounding at the smallest eigenvalue), fitted with room on the worst of
emulated TF32 runs under every rounding of the operands the hardware may use
(:data:`covpool.linalg.emulation.ROUNDINGS`: to nearest, ties to even or away from zero, and truncation,
which Triton's ``tf32`` does), and answered with ``inf`` outside the measured range, where the plan is
refused. The certificate holds for the worst rounding rather than for one probed on the device: no
probe runs at plan time (a plan is resolved on the host, also for fake tensors while tracing), and what
cuBLAS does on a given GPU and library version is not documented.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from covpool.linalg.coefficients import minimax_odd_polynomial
from covpool.linalg.emulation import EPSILON
from covpool.linalg.iteration import coupled_root
from covpool.linalg.lyapunov import SignFactor, apply_sign_factor, sign_factor
from covpool.linalg.schedule import MAX_STEPS, PolynomialStep, Schedule, image
from covpool.numerics import eye_like, symmetrize

MARGIN = 0.01
"""Relative room on both ends of every low-precision step (Polar Express's 1.01)."""

ProductHook = Callable[[], AbstractContextManager[object]]
"""A callable returning a context manager inside which the matrix products run in low precision."""


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
        """``(low, float32)`` matrix products of forward and backward as the roots run them: the sign
        factor takes 3 products a step of degree 2 (2 of degree 1) and each solve with it 4 (3). The
        forward: the coupled iteration, the factor of its ``Y``, and per refinement one float32 product for
        ``R``, a solve and two float32 products for ``Z``. The backward: the factor of the refined ``Y``
        (not kept from the forward: that would store ``3 · steps`` matrices where the float32 plan keeps
        ``Y`` alone), a solve, and one float32 product and a solve per correction. Without the
        a-posteriori test's (:func:`covpool.linalg.iteration.mixed_residual`)."""
        factor = sum(3 if step.degree == 2 else 2 for step in self.sign.steps)
        solve = sum(4 if step.degree == 2 else 3 for step in self.sign.steps)
        solves = self.refinements + 1 + self.backward_refinements
        return (
            self.forward.forward_products() + 2 * factor + solves * solve,
            3 * self.refinements + self.backward_refinements,
        )


def mixed_plan(
    lower: float,
    *,
    epsilon: float,
    refinements: int | None = None,
    backward_refinements: int | None = None,
    margin: float = MARGIN,
) -> MixedPlan:
    """The mixed plan for a normalised input whose ``Â^(1/2)`` has its spectrum in ``[lower, 1]`` (an mtp
    plan's ``lower``), with products of machine ``epsilon`` (:data:`covpool.linalg.emulation.EPSILON`).

    Both low-precision schedules stop at ``tol = 2 epsilon``: closer to 1 than the products' rounding they
    would only spend products. The upper end is 1: the float32 plan's room above it for the rounding of
    the normalisation (1e-4) is within the margin. The sign iteration's lower end leaves the forward's
    ``2 epsilon`` below the bound.

    ``refinements`` and ``backward_refinements`` default to what :func:`mixed_error_bound` is fitted for
    in TF32, three and one, and to two each for bfloat16 (one each leaves its gradient at up to 1e-3 at
    condition 1e3). In TF32 one forward refinement leaves the gradient 2.8e-3 off at condition 1e4; two
    hold the certificate's constants with 2x room only where the hardware rounds the operands to nearest:
    under truncation (Triton's ``tf32``) the errors of ``Z`` and of the gradient and a valid input's test
    value reach 0.8 to 1.2 times the constants, and a third refinement brings them back to what rounding to
    nearest gives (``python examples/studies/tf32_fit.py``, the plans 2/1 and 3/1 of
    ``examples/results/tf32_fit.json``). A second correction of the gradient gains little.
    """
    target = 2.0 * epsilon
    tf32 = epsilon <= EPSILON["tf32"]
    refinements = (3 if tf32 else 2) if refinements is None else refinements
    backward_refinements = (1 if tf32 else 2) if backward_refinements is None else backward_refinements
    return MixedPlan(
        lower,
        epsilon,
        margined_schedule(lower, 1.0, target, degree=2, margin=margin),
        margined_schedule(lower * (1.0 - target), 1.0, target, degree=2, margin=margin),
        refinements,
        backward_refinements,
    )


def mixed_sqrt(A_hat: torch.Tensor, plan: MixedPlan, low: ProductHook) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, Z) ≈ (Â^(1/2), Â^(-1/2))``: the plan's low-precision coupled iteration, then its float32
    refinements.

    The corrections solve with the sign factor of the low-precision ``Y``, not of the refined one: classic
    iterative refinement (factor once in low precision, residuals in high precision); the operator's
    error, about the low-precision forward's, adds to the contraction factor of each refinement. Shapes:
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
    return Y.reshape(shape), symmetrize(Z).reshape(shape)


def mixed_lyapunov(Y: torch.Tensor, G: torch.Tensor, plan: MixedPlan, low: ProductHook) -> torch.Tensor:
    """``X`` with ``Y X + X Y = sym(G)``: the low-precision sign iteration with the factor of ``Y`` and the
    plan's float32 residual corrections. Shapes: ``(*, n, n)`` each."""
    shape = Y.shape
    Y = Y.reshape(-1, shape[-2], shape[-1])
    G = symmetrize(G.reshape(-1, shape[-2], shape[-1]))
    with low():
        factor: SignFactor = sign_factor(Y, plan.sign)
        X = symmetrize(apply_sign_factor(factor, G, plan.sign))
    for _ in range(plan.backward_refinements):
        YX = Y @ X
        with low():
            X = X + symmetrize(apply_sign_factor(factor, G - YX - YX.mT, plan.sign))
    return X.reshape(shape)


TF32_DOMAIN = 0.14
"""Largest ``t = ε / lower`` the certificate covers: just above the largest ``t`` of the fitted runs
(condition 1e4); beyond it, at condition 1e5, TF32 runs end in NaN or far off. Both in the results of
``python examples/studies/tf32_fit.py``: ``examples/results/tf32_fit.json`` (column ``fitted``; the
summary it prints) and ``examples/results/tf32_fit.png``."""
MAX_FITTED_SIZE = 512
"""Largest ``n`` the certificate was fitted on."""
CERTIFIED_REFINEMENTS = 3
"""Fewest forward refinements the certificate covers (with at least one correction of the gradient): with
two, the constants keep 2x room only where the TF32 operands are rounded to nearest, not under truncation
(:func:`mixed_plan`; ``examples/results/tf32_fit.json``, table ``room_2_1``)."""
VALID_RESIDUAL_GROWTH = 0.1
"""Modelled :func:`covpool.linalg.iteration.mixed_residual` of a valid input,
``VALID_RESIDUAL_GROWTH · t²``: the largest ``residual/t²`` of the fitted runs with room
(``python examples/studies/tf32_fit.py``, ``examples/results/tf32_fit.json``)."""
ROOT_GROWTH = 2e-4
"""Modelled error of ``Y ≈ Â^(1/2)``, ``ROOT_GROWTH · t``: the largest ``root/t`` of the fitted runs with
room (``python examples/studies/tf32_fit.py``, ``examples/results/tf32_fit.json``)."""
INVERSE_GROWTH = 0.04
"""Modelled error of ``Z ≈ Â^(-1/2)`` and of the gradient, ``INVERSE_GROWTH · t²``: the largest
``inverse/t²`` and ``gradient/t²`` of the fitted runs with room (``python examples/studies/tf32_fit.py``,
``examples/results/tf32_fit.json``)."""


def mixed_error_bound(plan: MixedPlan, n: int) -> tuple[float, float]:
    """Modelled ``(forward, gradient)`` relative errors of a TF32 mixed plan on ``n × n`` input whose
    ``Â^(1/2)`` has its spectrum in ``[plan.lower, 1]``; forward is the larger of ``Y``'s and ``Z``'s.

    Fitted (``python examples/studies/tf32_fit.py``, recorded in ``examples/results/tf32_fit.json``) on
    emulated TF32 runs (:mod:`covpool.linalg.emulation`; float32 ``Â``, batches of 8, Gaussian upstream
    gradients, against float64 eigendecompositions) under each rounding of the operands
    (:data:`covpool.linalg.emulation.ROUNDINGS`), every constant with at least 2x room under each:
    ``random_spd``, user-ridged sample covariances (rank ``n / 2``) and spectra with all but two
    eigenvalues at the lower end, condition 1e2, 1e3, 1e4 (``t`` = 0.012 … 0.138), n = 32 … 256 with two
    seeds and n = 512 with one, at 3 refinements and 1 … 2 corrections. ``inf`` where the plan is not what
    was fitted (fewer than :data:`CERTIFIED_REFINEMENTS` refinements or no correction, products coarser
    than TF32) or the input lies outside the measured range (:data:`TF32_DOMAIN`,
    :data:`MAX_FITTED_SIZE`).
    """
    t = plan.epsilon / plan.lower
    fitted = (
        plan.epsilon <= EPSILON["tf32"]
        and plan.refinements >= CERTIFIED_REFINEMENTS
        and plan.backward_refinements >= 1
    )
    if not fitted or t > TF32_DOMAIN or n > MAX_FITTED_SIZE:
        return math.inf, math.inf
    gradient = INVERSE_GROWTH * t * t
    return max(ROOT_GROWTH * t, gradient), gradient


def mixed_valid_residual(plan: MixedPlan, n: int) -> float:
    """Modelled :func:`covpool.linalg.iteration.mixed_residual` of an input whose ``Â^(1/2)`` has its
    spectrum in ``[plan.lower, 1]``: ``VALID_RESIDUAL_GROWTH · t²`` (``inf`` where
    :func:`mixed_error_bound` is)."""
    if math.isinf(mixed_error_bound(plan, n)[0]):
        return math.inf
    t = plan.epsilon / plan.lower
    return VALID_RESIDUAL_GROWTH * t * t
