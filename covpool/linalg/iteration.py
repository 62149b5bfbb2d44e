"""Forward evaluation of ``Â^(1/2)`` and ``Â^(-1/2)`` for a normalised SPD ``Â`` (spectrum in ``(0, 1]``).

- :func:`coupled_root` runs a schedule (:mod:`covpool.linalg.schedule`) of the coupled iteration
  ``U = Z Y``, ``Y ← Y q(U)``, ``Z ← q(U) Z`` from ``Y₀ = Â``, ``Z₀ = I`` (Higham, "Stable iterations for the
  matrix square root", 1997), which returns both roots. The update of ``Z`` multiplies from the left: in
  float32, ``Z ← Z q(U)`` (which would let one product update ``Y`` and ``Z`` together) loses two digits
  at condition 1e4.
  Polynomial steps are evaluated by Horner's rule with each product fused to its addition
  (``baddbmm``); Padé steps by the Paterson-Stockmeyer scheme and a Cholesky solve, the denominator being
  SPD on the normalised spectrum (batched LU has failed on CPU for large SPD batches).
- :func:`residual_norm` bounds ``max_i |u_i - 1|`` over the eigenvalues of ``U_K = Z Y`` (``I`` at
  convergence) by a Schatten-8 norm, at the cost of three products: each ``u_i`` belongs to one eigenvalue
  of ``Â``, so a matrix whose spectrum leaves the schedule's interval, or which is not positive definite,
  shows there however small that eigenvalue (:class:`covpool.linalg.schedule.ResidualTest` turns the
  bound into a certificate). :func:`within_error`, weighted by the root, is ns's test of gross failure.
- :func:`direct_root` is the paper's single approximant, Taylor (MTP) or Padé (MPA) of ``(1 - z)^(±1/2)``
  at ``Z = I - Â``; its relative error is about ``2 q^(2m+1)``, ``q = (1 - √x) / (1 + √x)`` at the smallest
  normalised eigenvalue ``x``, so it is kept for the paper's configuration only.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from covpool.linalg.coefficients import pade_coefficients, taylor_coefficients
from covpool.linalg.polynomial import matrix_polynomials
from covpool.linalg.schedule import PadeStep, Schedule
from covpool.numerics import add_to_diagonal, eye_like, symmetrize


@torch.compiler.assume_constant_result
def _series_floats(series: str, degree: int, inverse: bool) -> tuple[tuple[float, ...], ...]:
    """Float coefficients of the series of ``(1 - z)^(1/2)`` (``^(-1/2)`` if ``inverse``): ``(taylor,)`` or
    ``(numerator, denominator)``.

    Marked constant so that ``torch.compile`` evaluates it on the host instead of tracing rational
    arithmetic; its arguments are plain constants (dynamo cannot pass a ``Fraction`` to it).
    """
    exponent = Fraction(-1 if inverse else 1, 2)
    if series == "taylor":
        tables = (taylor_coefficients(exponent, degree),)
    else:
        tables = pade_coefficients(exponent, degree, degree)
    return tuple(tuple(float(c) for c in table) for table in tables)


def _spd_solve(denominator: torch.Tensor, numerator: torch.Tensor) -> torch.Tensor:
    """``denominator⁻¹ numerator`` for SPD ``denominator`` (its lower triangle is read). Shapes ``(*, n, n)``.

    A factorisation that fails (the input was not positive definite) leaves NaN, which the validity flags
    of the caller catch; nothing is read on the host here.
    """
    factor, _ = torch.linalg.cholesky_ex(denominator)
    return torch.cholesky_solve(numerator, factor)


def _polynomial_tail(
    U: torch.Tensor, coefficients: tuple[float, ...], partials: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, float]:
    """``(T, a)`` with ``a T = Σ_{j>=1} c_j U^j = q(U) - c₀ I``: ``d - 1`` fused products, no identity.

    By the recursion ``Σ_{j>=k} c_j U^(j-k+1) = c_k U + U · Σ_{j>k} …``, one ``baddbmm`` per level; the
    right factor of each level is appended to ``partials`` when given (for the unrolled backward).
    Shapes ``(b, n, n)``.
    """
    value, alpha = U, coefficients[-1]
    for coefficient in reversed(coefficients[1:-1]):
        if partials is not None:
            partials.append(value)
        value, alpha = torch.baddbmm(U, U, value, beta=coefficient, alpha=alpha), 1.0
    return value, alpha


def _pade_factor(step: PadeStep, U: torch.Tensor) -> torch.Tensor:
    """``q(U) = μ Q(W)⁻¹ P(W)`` at ``W = I - μ² U``, by Paterson-Stockmeyer and a Cholesky solve.

    ``U = Z Y`` is symmetric only up to rounding, and the Cholesky factorisation reads one triangle of
    ``Q``: ``W`` is formed from the symmetric part of ``U`` (without it, float32 loses all accuracy at
    condition 1e5).
    """
    W = torch.add(eye_like(U), symmetrize(U), alpha=-(step.scale**2))
    P, Q = matrix_polynomials(W, (step.numerator, step.denominator))
    return _spd_solve(Q, P) * step.scale


def coupled_root(
    A_hat: torch.Tensor,
    schedule: Schedule,
    record: list[torch.Tensor] | None = None,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, Z) ≈ (Â^(1/2), Â^(-1/2))`` after the steps of ``schedule``. Shapes: ``(*, n, n)`` each.

    Differentiable by autograd (ns and unrolled mpa rely on it); :mod:`covpool.linalg.roots` runs it
    without a graph for the other methods. Leading batch dimensions are flattened. With ``record`` (a
    list; polynomial steps only), every step appends what :func:`covpool.linalg.unrolled.coupled_root_adjoint`
    needs: ``Y`` and ``Z`` before the step (``Z`` from the second step on), the Horner partials of
    :func:`_polynomial_tail` and its result ``T``. With ``start = (Y, Z)`` (no ``record``), the steps continue
    from that pair instead of ``(Â, I)`` (:mod:`covpool.linalg.mixed` finishes low-precision steps so).
    """
    shape = A_hat.shape
    Y = A_hat.reshape(-1, shape[-2], shape[-1])
    Z = None  # the identity
    if start is not None:
        Y, Z = (x.reshape(-1, shape[-2], shape[-1]) for x in start)
    for step in schedule.steps:
        U = Y if Z is None else Z @ Y
        if isinstance(step, PadeStep):
            factor = _pade_factor(step, U)
            Y, Z = Y @ factor, factor if Z is None else factor @ Z
            continue
        # q(U) = c₀ I + a T: Y q = c₀ Y + a Y T and q Z = c₀ Z + a T Z, each one fused product.
        c0 = step.coefficients[0]
        partials = None if record is None else []
        tail, alpha = _polynomial_tail(U, step.coefficients, partials)
        if record is not None:
            record.extend([Y, *([] if Z is None else [Z]), U, *partials, tail])
        Y_next = torch.baddbmm(Y, Y, tail, beta=c0, alpha=alpha)
        if Z is None:  # q(Â) itself, in a fresh tensor: ``tail`` may be saved for the backward
            Z = add_to_diagonal(tail, c0 / alpha)
            Z = Z * alpha if alpha != 1.0 else Z
        else:
            Z = torch.baddbmm(Z, tail, Z, beta=c0, alpha=alpha)
        Y = Y_next
    if Z is None:
        Z = eye_like(Y).expand_as(Y)
    return Y.reshape(shape), Z.reshape(shape)


def within_error(Y: torch.Tensor, Z: torch.Tensor, limit: float, *, inverse: bool) -> torch.Tensor:
    """Whether the estimated relative Frobenius error of ``Y`` (``Z`` if ``inverse``) is at most ``limit``.

    The estimate comes from ``R = Z Y - I``.

    At convergence ``Z Y = I``. An eigenvalue ``u`` of ``Z Y`` gives ``Y`` and ``Z`` the relative error
    ``|√u - 1| ≈ |u - 1| / 2`` in that direction, so ``‖R Y‖_F / (2 ‖Y‖_F)`` estimates the error of
    ``Y`` with each direction weighted as in ``Y`` (likewise for ``Z``). A negative eigenvalue of ``A``
    drives ``u`` negative and the estimate beyond 1/2; NaN or Inf anywhere fails the test; an all-zero
    root passes it.

    Shapes: ``(*, n, n)`` each → ``(*,)`` bool.
    """
    batch = Y.shape[:-2]
    Y, Z = Y.reshape(-1, *Y.shape[-2:]), Z.reshape(-1, *Z.shape[-2:])
    root = Z if inverse else Y
    weight = 1.0 / (2.0 * limit)
    residual = torch.baddbmm(root, Z @ Y, root, beta=-weight, alpha=weight)  # R · root / (2 limit)
    return (torch.linalg.matrix_norm(residual) <= torch.linalg.matrix_norm(root)).reshape(batch)


def residual_rounding(
    method: str, n: int, unit_roundoff: float, lower: float, *, product_roundoff: float | None = None
) -> float:
    """What rounding adds to :func:`residual_norm` for a valid input, ``lower`` being the bound on the
    smallest eigenvalue of ``Â^(1/2)`` (``1 / lower`` bounds ``‖Z‖``).

    Measured on float32 ridged sample covariances (n = 16 … 256, 4 … 49 positions, eps = 1e-6 … 1e-4):
    mtp up to ``0.11 √n u / lower``, modelled as ``0.25 √n u / lower``; mpa, whose Cholesky solves leave
    ``Z Y`` further from ``I``, up to ``0.1 u / lower²``, modelled as ``0.2 u / lower²``.

    ``product_roundoff``: the machine epsilon of the products' format when they round their operands more
    coarsely than the working dtype (TF32 ``2^-10``, bfloat16 ``2^-7``); the larger of the two is ``u``.
    Emulated TF32 and bfloat16 mtp runs stay within it (``tests/test_linalg_mixed.py``).
    """
    if product_roundoff is not None:
        unit_roundoff = max(unit_roundoff, product_roundoff)
    if method == "mpa":
        return 0.2 * unit_roundoff / lower**2
    return 0.25 * n**0.5 * unit_roundoff / lower


RESIDUAL_TEST_PRODUCTS = 3
"""Matrix products of :func:`residual_norm`."""
MIXED_TEST_PRODUCTS = 8
"""Matrix products of :func:`mixed_residual`."""


def _quartic_norm(R: torch.Tensor) -> torch.Tensor:
    """``‖R⁴‖_F^(1/4)`` per matrix: two products in ``R``'s dtype, the norm in float64, whose range holds
    the eighth powers of entries that a float32 norm flushes to 0 (below about 3e-6: such a residual
    would read 0 and pass any limit). Shapes: ``(b, n, n)`` → ``(b,)``, ``R``'s dtype."""
    R2 = R @ R
    return torch.linalg.matrix_norm(R2 @ R2, dtype=torch.float64).pow(0.25).to(R.dtype)


def residual_norm(Y: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """``‖(Z Y - I)⁴‖_F^(1/4)``, at least ``max_i |u_i - 1|`` over the eigenvalues ``u_i`` of ``Z Y`` and
    at most ``n^(1/8)`` times it (``Z Y`` is symmetric in exact arithmetic). NaN or Inf anywhere gives NaN
    or Inf. Three fused products.

    Shapes: ``(*, n, n)`` each → ``(*,)``.
    """
    batch = Y.shape[:-2]
    Y, Z = Y.reshape(-1, *Y.shape[-2:]), Z.reshape(-1, *Z.shape[-2:])
    return _quartic_norm(torch.baddbmm(eye_like(Y), Z, Y, beta=-1.0)).reshape(batch)


def mixed_residual(A_hat: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """The a-posteriori test of a mixed-precision plan (:mod:`covpool.linalg.mixed`), in the working dtype:
    the larger of :func:`residual_norm` (``Z Y - I``) and half that of ``Z (Â - Y²) Z``, an estimate of
    the largest relative error of an eigenvalue of ``Y`` (``y = √λ (1 + e)`` gives
    ``(λ - y²) / y² ≈ -2 e``), within ``n^(1/8)`` of it. Eight products. NaN or Inf anywhere gives NaN or
    Inf. Shapes: ``(*, n, n)`` each → ``(*,)``."""
    batch = Y.shape[:-2]
    A_hat, Y, Z = (M.reshape(-1, *M.shape[-2:]) for M in (A_hat, Y, Z))
    relative = Z @ torch.baddbmm(A_hat, Y, Y, alpha=-1.0) @ Z
    return torch.maximum(residual_norm(Y, Z), _quartic_norm(relative) / 2.0).reshape(batch)


def passes_residual_test(
    A_hat: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor, limit: float, *, inverse: bool, mixed: bool = False
) -> torch.Tensor:
    """Whether :func:`residual_norm` (:func:`mixed_residual` for a ``mixed`` plan) is below ``limit`` (the
    plan's :class:`covpool.linalg.schedule.ResidualTest`). The square root of an all-zero ``Â`` passes: it
    is exact (its gradient is not defined). Shapes: ``(*, n, n)`` each → ``(*,)`` bool."""
    passes = (mixed_residual(A_hat, Y, Z) if mixed else residual_norm(Y, Z)) < limit
    if inverse:
        return passes
    return passes | (A_hat == 0).flatten(-2).all(-1)


def direct_root(A_hat: torch.Tensor, *, series: str, degree: int, inverse: bool) -> torch.Tensor:
    """The paper's approximant ``(I - Z)^(±1/2)`` at ``Z = I - Â``. Shape: ``(*, n, n)``."""
    W = eye_like(A_hat) - A_hat
    polynomials = matrix_polynomials(W, _series_floats(series, degree, inverse))
    if series == "taylor":
        return polynomials[0]
    P, Q = polynomials
    return _spd_solve(Q, P)
