"""Forward evaluation of ``Â^(1/2)`` and ``Â^(-1/2)`` for a normalised SPD matrix ``Â`` (``λmax ≈ 1``).

Two schemes share one set of series (:mod:`covpool.linalg.coefficients`):

- :func:`direct_root` — the paper's single approximant: Taylor (MTP) or Padé (MPA) of ``(1 - z)^(±1/2)``
  at ``Z = I - Â``. Its accuracy is set by the smallest normalised eigenvalue ``x``: a Padé ``[m/m]``
  has relative error about ``2 q^(2m+1)`` with ``q = (1 - √x) / (1 + √x)``, so [5/5] loses two digits at
  ``x = 1e-3`` alone.
- :func:`coupled_root` — the coupled iteration ``Y_{k+1} = Y_k r(W_k)``, ``Z_{k+1} = r(W_k) Z_k`` with
  ``W_k = I - Z_k Y_k``, ``Y_0 = Â``, ``Z_0 = I`` and ``r ≈ (1 - w)^(-1/2)`` (Higham, "Stable iterations
  for the matrix square root", 1997). With the Padé ``[m/m]`` step it converges with order ``2m + 1``:
  ``q → q^(2m+1)`` per step, so two [5/5] steps reach ``q^121`` at about twice the cost of one, where one
  [60/60] approximant would be needed otherwise. With the Taylor step of degree 1 it is the Newton-Schulz
  iteration of iSQRT-COV. Both ``Y → Â^(1/2)`` and ``Z → Â^(-1/2)`` come out, which the backward uses.

The Padé denominator is SPD on the normalised spectrum, so its solve is a Cholesky solve (batched LU has
failed on CPU for large SPD batches).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from covpool.linalg.coefficients import pade_coefficients, taylor_coefficients
from covpool.linalg.polynomial import matrix_polynomials

_INVERSE_ROOT = Fraction(-1, 2)
_ROOT = Fraction(1, 2)


@torch.compiler.assume_constant_result
def _series_floats(series: str, degree: int, exponent: Fraction) -> tuple[tuple[float, ...], ...]:
    """Float coefficients of the series: ``(taylor,)`` or ``(numerator, denominator)``.

    Marked constant so that ``torch.compile`` evaluates it once instead of tracing rational arithmetic.
    """
    if series == "taylor":
        tables = (taylor_coefficients(exponent, degree),)
    else:
        tables = pade_coefficients(exponent, degree, degree)
    return tuple(tuple(float(c) for c in table) for table in tables)


def _spd_solve(denominator: torch.Tensor, numerator: torch.Tensor, check: bool) -> torch.Tensor:
    """``denominator⁻¹ numerator`` for SPD ``denominator`` by Cholesky. Shapes ``(*, n, n)``."""
    factor, info = torch.linalg.cholesky_ex(0.5 * (denominator + denominator.mT))
    if check and bool((info != 0).any()):
        raise ValueError(
            "A must be symmetric positive semi-definite: the Padé denominator lost positive "
            "definiteness, which happens when A has clearly negative eigenvalues"
        )
    return torch.cholesky_solve(numerator, factor)


def _apply_series(W: torch.Tensor, series: str, degree: int, exponent: Fraction, check: bool) -> torch.Tensor:
    """``r(W) ≈ (I - W)^exponent`` by the Taylor polynomial or the diagonal Padé approximant of ``degree``."""
    polynomials = matrix_polynomials(W, _series_floats(series, degree, exponent))
    if series == "taylor":
        return polynomials[0]
    P, Q = polynomials
    return _spd_solve(Q, P, check)


def direct_root(
    A_hat: torch.Tensor, *, series: str, degree: int, inverse: bool, check: bool = True
) -> torch.Tensor:
    """The paper's approximant ``(I - Z)^(±1/2)`` at ``Z = I - Â``. Shape: ``(*, n, n)``."""
    eye = torch.eye(A_hat.shape[-1], dtype=A_hat.dtype, device=A_hat.device)
    return _apply_series(eye - A_hat, series, degree, _INVERSE_ROOT if inverse else _ROOT, check)


def coupled_root(
    A_hat: torch.Tensor, *, series: str, degree: int, steps: int, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, Z) ≈ (Â^(1/2), Â^(-1/2))`` after ``steps`` coupled steps. Shapes: ``(*, n, n)`` each.

    Differentiable by autograd (the ``"ns"`` method relies on it); :mod:`covpool.linalg.roots` runs it
    without a graph for the methods with a Lyapunov backward.
    """
    eye = torch.eye(A_hat.shape[-1], dtype=A_hat.dtype, device=A_hat.device)
    step = _apply_series(eye - A_hat, series, degree, _INVERSE_ROOT, check)
    Y, Z = A_hat @ step, step
    for _ in range(steps - 1):
        product = Z @ Y
        W = eye - 0.5 * (product + product.mT)
        step = _apply_series(W, series, degree, _INVERSE_ROOT, check)
        Y, Z = Y @ step, step @ Z
    return Y, Z
