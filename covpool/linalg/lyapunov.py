"""The one solver of the Lyapunov equation ``Y X + X Y = C`` (``Y`` SPD with spectrum in about ``(0, 1]``).

This is the backward of the matrix square root: for ``S = √c Y = A^(1/2)`` and ``G = ∂L/∂S``,
``∂L/∂A = X`` with ``C = G / √c``. Following Song, Sebe & Wang (ICLR 2022), ``X`` is read from the sign of
``M = [[Y, C], [0, -Y]]``: ``sign(M) = [[I, 2X], [0, -I]]``. The sign is computed by composing odd
polynomials ``p(s) = s q(s²)`` applied to ``M``, the steps of a certified schedule
(:mod:`covpool.linalg.schedule`): the off-diagonal block of ``P(M)`` is
``C_ij (P(b_i) + P(b_j)) / (b_i + b_j)`` in the eigenbasis of ``Y``, so the relative error of ``X`` is at most
the schedule's bound on ``|P(b) - 1|``. The paper uses 8 fixed Newton-Schulz steps ``p(s) = s (3 - s²) / 2``
(an instance of the same solver); a minimax step of degree 5 multiplies a small ``b`` by about 8.5 where
Newton-Schulz multiplies it by 1.5, and the step count follows from the spectrum bound and ``tol``.

One step on ``M``, with ``M² = [[B², D], [0, B²]]`` and ``D = B C - C B = BC - (BC)ᵀ`` (``B``, ``C``
symmetric): ``q(M²) = [[H, K], [0, H]]`` and ``p(M) = [[B H, B K + C H], [0, -B H]]``.

- degree 1, ``q(u) = c₀ + c₁u``: ``H = c₀I + c₁B²``, ``K = c₁D``; products ``B², BC, BH, BK, CH``: 5.
- degree 2: ``H = c₀I + c₁B² + c₂B⁴``, ``K = c₁D + c₂(B²D + DB²)`` with ``DB² = -(B²D)ᵀ``; products
  ``B², BC, B⁴, B²D, BH, BK, CH``: 7.

Every ``c₀ I`` term and every sum is folded into a ``baddbmm`` (``beta · input + alpha · A @ B``), so a
degree-2 step launches 9 kernels for its 7 products and no identity matrix is ever formed.

Nothing is kept from one step to the next, so memory does not grow with the step count.

Rounding limits this backward on ill-conditioned input: it solves with the computed root ``Y``, whose
small eigen-directions carry the forward iteration's rounding, and the sign iteration mixes the large
entries of ``X`` (about ``1 / (2 s_min)``) into the small ones. :func:`rounding_error` models the result.
"""

from __future__ import annotations

import torch

from covpool.linalg.schedule import Schedule

ROUNDING_GROWTH = 0.04
"""Bound on ``error / (u κ)`` of the float32 gradient, ``κ`` the ridge's bound on ``κ(A)`` (mtp forward and
this backward against float64 Daleckii-Krein, ridged sample covariances, n = 32 … 256, κ = 1e5 … 3e7).
Measured by ``python examples/studies/rounding.py``, recorded in ``examples/results/rounding.json`` (table
``rows``, column ``lyapunov_growth``); rounding depends on the BLAS and thread count, hence the room."""


def rounding_error(lower: float, unit_roundoff: float, *, product_roundoff: float | None = None) -> float:
    """Relative error of the gradient that rounding alone leaves, ``ROUNDING_GROWTH · u · κ(A)``.

    ``lower`` is the lower end of the spectrum of ``Â^(1/2)`` (so ``κ(A) <= 1 / lower²``) and ``u`` the
    working dtype's machine epsilon: 1e-3 at ``κ = 2e5`` in float32, 1e-12 at ``κ = 1.1e5`` in float64.
    ``product_roundoff``: the machine epsilon of products that round their operands more coarsely (TF32
    ``2^-10``, bfloat16 ``2^-7``); the larger of the two is ``u`` (emulated TF32 and bfloat16 solves stay
    within the model, ``tests/test_linalg_mixed.py``).
    """
    if product_roundoff is not None:
        unit_roundoff = max(unit_roundoff, product_roundoff)
    return ROUNDING_GROWTH * unit_roundoff / lower**2


SignFactor = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], ...]
"""Per step of a sign iteration on ``Y``: ``(B, B², T)`` (``T = c₁B² + c₂B⁴`` for degree 2, else None),
what the right-hand side's update reads (:func:`sign_factor`)."""


def operator_step(
    B: torch.Tensor, coefficients: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(B², T, B H)`` of one step: the new diagonal block ``B H = c₀ B + B T`` (degree 1: ``T`` is None
    and ``B H = c₀ B + c₁ B B²``)."""
    B2 = B @ B
    if len(coefficients) == 2:
        c0, c1 = coefficients
        return B2, None, torch.baddbmm(B, B, B2, beta=c0, alpha=c1)
    if len(coefficients) == 3:
        c0, c1, c2 = coefficients
        T = torch.baddbmm(B2, B2, B2, beta=c1, alpha=c2)  # H = c0 I + T
        return B2, T, torch.baddbmm(B, B, T, beta=c0)
    raise ValueError(f"sign steps of degree 1 or 2 are supported, got {len(coefficients) - 1}")


def rhs_step(
    B: torch.Tensor,
    B2: torch.Tensor,
    T: torch.Tensor | None,
    C: torch.Tensor,
    coefficients: tuple[float, ...],
    c_scale: float,
) -> torch.Tensor:
    """The new off-diagonal block ``B K + C H`` of one step, times ``c_scale`` (free: it is the last
    product's alpha/beta)."""
    BC = B @ C
    D = BC - BC.mT
    if T is None:
        c0, c1 = coefficients
        # B K + C H = c1 B D + c0 C + c1 C B².
        return torch.baddbmm(
            torch.baddbmm(C, B, D, beta=c0, alpha=c1), C, B2, beta=c_scale, alpha=c1 * c_scale
        )
    c0, c1, c2 = coefficients
    # K = c1 D + c2 (B²D + DB²) = c1 (F - Fᵀ) with F = BC + (c2/c1) B²D, since DB² = -(B²D)ᵀ.
    F = torch.baddbmm(BC, B2, D, alpha=c2 / c1)
    BK_plus_c0C = torch.baddbmm(C, B, F - F.mT, beta=c0, alpha=c1)
    return torch.baddbmm(BK_plus_c0C, C, T, beta=c_scale, alpha=c_scale)


def sign_factor(Y: torch.Tensor, schedule: Schedule) -> SignFactor:
    """The diagonal blocks of every step of the sign iteration on ``Y`` (``(b, n, n)``), kept so that
    :func:`apply_sign_factor` solves for several right-hand sides at the products of the off-diagonal block
    alone (4 a step of degree 2 instead of 7, 3 of degree 1 instead of 5); costs ``3 · steps`` matrices of
    memory, which :func:`solve_lyapunov` does not keep."""
    factor, B = [], Y
    for step in schedule.steps:
        B2, T, B_next = operator_step(B, step.coefficients)
        factor.append((B, B2, T))
        B = B_next
    return tuple(factor)


def apply_sign_factor(factor: SignFactor, C: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """:func:`solve_lyapunov` for ``Y`` given by its :func:`sign_factor`. Shapes: ``(b, n, n)``."""
    last = len(schedule.steps) - 1
    for k, ((B, B2, T), step) in enumerate(zip(factor, schedule.steps, strict=True)):
        C = rhs_step(B, B2, T, C, step.coefficients, 0.5 if k == last else 1.0)
    return C


def solve_lyapunov(Y: torch.Tensor, C: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Solve ``Y X + X Y = C`` for ``X`` by the sign iteration with the steps of ``schedule``.

    Args:
        Y: ``(*, n, n)`` SPD, spectrum within the schedule's interval.
        C: ``(*, n, n)`` symmetric right-hand side.
        schedule: polynomial steps certified on the spectrum of ``Y``.

    Returns:
        ``(*, n, n)`` ``X``, symmetric up to rounding; relative error at most ``schedule.error`` (in exact
        arithmetic).
    """
    shape = Y.shape
    B = Y.reshape(-1, shape[-2], shape[-1])
    C = C.reshape(-1, shape[-2], shape[-1])
    last = len(schedule.steps) - 1
    for k, step in enumerate(schedule.steps):
        B2, T, B_next = operator_step(B, step.coefficients)
        # sign(M) has 2X in its corner: the last step halves its result.
        B, C = B_next, rhs_step(B, B2, T, C, step.coefficients, 0.5 if k == last else 1.0)
    return C.reshape(shape)
