"""Evaluation of matrix polynomials that share one argument, by the Paterson-Stockmeyer scheme.

``p(W) = Σ_k a_k W^k`` is split into blocks of ``s`` terms, ``p(W) = Σ_j B_j(W) (W^s)^j`` with
``B_j(W) = Σ_{i<s} a_{js+i} W^i``, and evaluated by Horner's rule in ``W^s``. The powers
``W^2 … W^s`` are computed once and shared by every polynomial, so ``L`` polynomials of degree ``d`` cost
``(s - 1) + L ⌈(d + 1) / s - 1⌉`` matrix products instead of ``d - 1 + …``; ``s`` is chosen to
minimise that count (e.g. a Padé [5/5] pair takes 4 products, a [8/8] pair 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def product_count(degree: int, num_polynomials: int, block: int) -> int:
    """Matrix products needed for ``num_polynomials`` polynomials of ``degree`` with block size ``block``."""
    horner_steps = math.ceil((degree + 1) / block) - 1
    powers = block - 1 if horner_steps > 0 else degree - 1
    return max(powers, 0) + num_polynomials * horner_steps


def best_block(degree: int, num_polynomials: int) -> int:
    """Block size ``s`` in ``1 … degree + 1`` with the fewest products (the smaller ``s`` on ties)."""
    return min(range(1, degree + 2), key=lambda s: (product_count(degree, num_polynomials, s), s))


def matrix_polynomials(W: torch.Tensor, coefficients: Sequence[Sequence[float]]) -> list[torch.Tensor]:
    """Evaluate ``p_l(W) = Σ_k coefficients[l][k] W^k`` for every ``l``.

    Args:
        W: ``(*, n, n)`` matrices.
        coefficients: one sequence of floats per polynomial, lowest degree first.

    Returns:
        One ``(*, n, n)`` tensor per polynomial.
    """
    degree = max(len(c) for c in coefficients) - 1
    coefficients = [list(c) + [0.0] * (degree + 1 - len(c)) for c in coefficients]
    block = best_block(degree, len(coefficients))
    horner_steps = math.ceil((degree + 1) / block) - 1
    top_power = block if horner_steps > 0 else degree
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    powers = [eye, W]
    for _ in range(2, top_power + 1):
        powers.append(powers[-1] @ W)

    def block_sum(coeffs: Sequence[float], start: int) -> torch.Tensor:
        terms = coeffs[start : start + block]
        total = (terms[0] * eye).expand_as(W)
        for power, a in zip(powers[1:], terms[1:], strict=False):
            total = torch.add(total, power, alpha=a)
        return total

    results = []
    for coeffs in coefficients:
        value = block_sum(coeffs, horner_steps * block)
        for j in range(horner_steps - 1, -1, -1):
            value = value @ powers[block] + block_sum(coeffs, j * block)
        results.append(value)
    return results
