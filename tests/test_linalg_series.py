"""Coefficient tables and matrix-polynomial evaluation."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from covpool.linalg.coefficients import pade_coefficients, taylor_coefficients
from covpool.linalg.polynomial import best_block, matrix_polynomials, product_count


class TestCoefficients:
    def test_taylor_of_square_root(self):
        assert taylor_coefficients(Fraction(1, 2), 3) == (
            1,
            Fraction(-1, 2),
            Fraction(-1, 8),
            Fraction(-1, 16),
        )

    def test_taylor_of_inverse_root(self):
        assert taylor_coefficients(Fraction(-1, 2), 3) == (1, Fraction(1, 2), Fraction(3, 8), Fraction(5, 16))

    @pytest.mark.parametrize("exponent", [Fraction(1, 2), Fraction(-1, 2)])
    @pytest.mark.parametrize(("m", "n"), [(1, 1), (2, 2), (5, 5), (3, 2), (2, 4)])
    def test_pade_matches_taylor_to_order_m_plus_n(self, exponent, m, n):
        p, q = pade_coefficients(exponent, m, n)
        c = taylor_coefficients(exponent, m + n)
        assert len(p) == m + 1 and len(q) == n + 1 and q[0] == 1
        for k in range(m + n + 1):
            product = sum(q[j] * c[k - j] for j in range(min(k, n) + 1))
            assert product == (p[k] if k <= m else 0)

    @pytest.mark.parametrize("degree", [1, 2, 5, 8])
    def test_inverse_root_pade_is_reciprocal_of_root_pade(self, degree):
        p, q = pade_coefficients(Fraction(1, 2), degree, degree)
        p_inv, q_inv = pade_coefficients(Fraction(-1, 2), degree, degree)
        assert (p_inv, q_inv) == (q, p)


class TestPolynomials:
    @pytest.mark.parametrize("degrees", [(0,), (1,), (3, 3), (5, 5), (8, 4), (13,)])
    def test_matches_naive_powers(self, degrees):
        W = 0.4 * torch.randn(3, 6, 6, dtype=torch.float64)
        coefficients = [[1.0 / (k + 1) for k in range(d + 1)] for d in degrees]
        values = matrix_polynomials(W, coefficients)
        for coeffs, value in zip(coefficients, values, strict=True):
            naive = sum(a * torch.linalg.matrix_power(W, k) for k, a in enumerate(coeffs))
            torch.testing.assert_close(value, naive, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize(
        ("degree", "count", "products"), [(5, 2, 4), (8, 2, 6), (2, 2, 1), (1, 1, 0), (8, 1, 4)]
    )
    def test_product_counts(self, degree, count, products):
        assert product_count(degree, count, best_block(degree, count)) == products

    def test_counted_products_are_the_products_made(self, monkeypatch):
        made = []
        original = torch.Tensor.__matmul__

        def counting(self, other):
            made.append(1)
            return original(self, other)

        monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
        matrix_polynomials(torch.randn(4, 4), [[1.0] * 9, [2.0] * 9])
        assert len(made) == product_count(8, 2, best_block(8, 2))
