"""Exact Taylor and Padé coefficients of ``(1 - z)^p``.

Computed once per (exponent, degree) in rational arithmetic (:class:`fractions.Fraction`) and cached, so
any degree is available and every coefficient is exact before its single rounding to float.
This module is the only place coefficients come from.
"""

from __future__ import annotations

import functools
from fractions import Fraction


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
