"""Every coefficient covpool's iterations use: Taylor, Padé and minimax polynomials.

- Taylor and Padé coefficients of ``(1 - z)^p`` are computed once per (exponent, degree) in rational
  arithmetic (:class:`fractions.Fraction`) and cached, so any degree is available and every coefficient is
  exact before its single rounding to float.
- Minimax odd polynomials ``p(s) = Σ_j c_j s^(2j+1)`` that best approximate 1 on an interval ``[a, b]``
  (``0 < a < b``) in the maximum norm are computed by the Remez exchange algorithm in float64. They are the
  steps of the coupled square-root iteration and of the Lyapunov sign iteration
  (:mod:`covpool.linalg.schedule`): composing them is the fastest way to push a spectrum towards 1
  (Chen & Chow, 2014; Amsel et al., "The Polar Express", 2025, for the polar decomposition).

This module is the only place coefficients come from.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np


@functools.cache
def taylor_coefficients(exponent: Fraction, degree: int) -> tuple[Fraction, ...]:
    """Coefficients ``c_0 … c_degree`` of the Taylor series ``(1 - z)^exponent = Σ c_k z^k``.

    ``c_k = (-1)^k binom(exponent, k)``, built by the recurrence ``c_k = c_{k-1} (k - 1 - exponent) / k``.

    Example:
        >>> taylor_coefficients(Fraction(1, 2), 2)
        (Fraction(1, 1), Fraction(-1, 2), Fraction(-1, 8))
    """
    coefficients = [Fraction(1)]
    for k in range(1, degree + 1):
        coefficients.append(coefficients[-1] * (k - 1 - exponent) / k)
    return tuple(coefficients)


@functools.cache
def pade_coefficients(
    exponent: Fraction, numerator_degree: int, denominator_degree: int
) -> tuple[tuple[Fraction, ...], tuple[Fraction, ...]]:
    """Padé approximant ``[M/N]`` of ``(1 - z)^exponent``: coefficients of ``P`` (degree M) and ``Q``.

    ``Q`` is normalised to ``q_0 = 1``. The denominator solves the ``N`` linear equations that cancel the
    Taylor coefficients of ``Q f - P`` at orders ``M+1 … M+N``; the numerator is then the truncated
    product ``Q f``. Solved exactly by Gaussian elimination over the rationals.

    Example:
        >>> p, q = pade_coefficients(Fraction(1, 2), 1, 1)
        >>> p, q
        ((Fraction(1, 1), Fraction(-3, 4)), (Fraction(1, 1), Fraction(-1, 4)))
    """
    M, N = numerator_degree, denominator_degree
    c = taylor_coefficients(exponent, M + N)

    def coefficient(k: int) -> Fraction:
        return c[k] if k >= 0 else Fraction(0)

    # Rows k = M+1 .. M+N of Σ_{j=1..N} q_j c_{k-j} = -c_k, unknowns q_1 .. q_N.
    system = [
        [coefficient(k - j) for j in range(1, N + 1)] + [-coefficient(k)] for k in range(M + 1, M + N + 1)
    ]
    for col in range(N):
        pivot = next(row for row in range(col, N) if system[row][col] != 0)
        system[col], system[pivot] = system[pivot], system[col]
        for row in range(N):
            if row != col and system[row][col] != 0:
                factor = system[row][col] / system[col][col]
                system[row] = [a - factor * b for a, b in zip(system[row], system[col], strict=True)]
    q = (Fraction(1),) + tuple(system[i][N] / system[i][i] for i in range(N))
    p = tuple(sum(q[j] * c[k - j] for j in range(min(k, N) + 1)) for k in range(M + 1))
    return p, q


def _odd_values(coefficients: np.ndarray, s: np.ndarray) -> np.ndarray:
    return sum(c * s ** (2 * j + 1) for j, c in enumerate(coefficients))


@functools.cache
def minimax_odd_polynomial(lower: float, upper: float, degree: int) -> tuple[tuple[float, ...], float]:
    """Odd polynomial of degree ``2·degree + 1`` closest to 1 on ``[lower, upper]`` in the maximum norm.

    The odd monomials ``s, s³, …`` form a Haar system on ``(0, ∞)``, so the best approximation is unique and
    characterised by ``degree + 2`` points of equal, alternating error; the Remez exchange finds them on a
    dense grid (geometric and uniform points, so that tiny ``lower`` is resolved).

    Args:
        lower: left end ``a > 0``.
        upper: right end ``b > a``.
        degree: ``d >= 1``; the polynomial has ``d + 1`` coefficients.

    Returns:
        ``(c_0, …, c_d)`` with ``p(s) = Σ c_j s^(2j+1)``, and ``max |p(s) - 1|`` on a dense grid.

    Raises:
        ArithmeticError: the exchange broke down (a degree too high for a tiny ``lower``).

    Example:
        >>> coefficients, error = minimax_odd_polynomial(0.1, 1.0, 1)
        >>> round(error, 3)
        0.607
    """
    if not 0 < lower < upper:
        raise ValueError(f"need 0 < lower < upper, got lower={lower}, upper={upper}")
    points = degree + 2
    grid = np.unique(np.concatenate([np.geomspace(lower, upper, 3000), np.linspace(lower, upper, 3000)]))
    reference = np.geomspace(lower, upper, points)
    signs = (-1.0) ** np.arange(points)
    for _ in range(100):
        powers = np.stack([reference ** (2 * j + 1) for j in range(degree + 1)], axis=1)
        try:
            solution = np.linalg.solve(np.concatenate([powers, signs[:, None]], axis=1), np.ones(points))
        except np.linalg.LinAlgError as error:  # reference points merged: the degree is too high here
            message = f"Remez exchange broke down for degree {degree} on [{lower}, {upper}]"
            raise ArithmeticError(message) from error
        coefficients = solution[:-1]
        error = _odd_values(coefficients, grid) - 1.0
        slope = np.diff(error)
        turning = np.flatnonzero(slope[:-1] * slope[1:] <= 0) + 1
        candidates = np.concatenate([[0], turning, [len(grid) - 1]])
        alternating: list[int] = []
        for i in candidates:
            if alternating and np.sign(error[i]) == np.sign(error[alternating[-1]]):
                if abs(error[i]) > abs(error[alternating[-1]]):
                    alternating[-1] = i
            else:
                alternating.append(i)
        while len(alternating) > points:
            alternating.pop(0 if abs(error[alternating[0]]) < abs(error[alternating[-1]]) else -1)
        if len(alternating) < points:
            break
        new_reference = grid[alternating]
        if np.array_equal(new_reference, reference):
            break
        reference = new_reference
    # The certificate must not rest on the exchange grid: measure the error on a 30 times denser one.
    dense = np.concatenate([np.geomspace(lower, upper, 100_000), np.linspace(lower, upper, 100_000)])
    return tuple(float(c) for c in coefficients), float(np.abs(_odd_values(coefficients, dense) - 1.0).max())
