"""Coefficient tables, minimax polynomials, certified schedules and matrix-polynomial evaluation."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import covpool
from covpool.bench.trace import FAKE_CUDA_SUPPORTED
from covpool.linalg.coefficients import minimax_odd_polynomial, pade_coefficients, taylor_coefficients
from covpool.linalg.planner import plan_root
from covpool.linalg.polynomial import best_block, matrix_polynomials, product_count
from covpool.linalg.schedule import (
    BACKWARD_DEGREES,
    FORWARD_DEGREES,
    differentiable_schedule,
    gradient_error,
    minimax_schedule,
    newton_schulz_schedule,
    pade_schedule,
    step_map,
)


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


class TestMinimax:
    @pytest.mark.parametrize("degree", [1, 2, 3])
    @pytest.mark.parametrize(("lower", "upper"), [(1e-3, 1.0), (0.1, 1.0), (0.9, 1.1)])
    def test_error_is_the_maximum_and_alternates(self, degree, lower, upper):
        coefficients, error = minimax_odd_polynomial(lower, upper, degree)
        s = np.linspace(lower, upper, 400_001)
        e = sum(c * s ** (2 * j + 1) for j, c in enumerate(coefficients)) - 1.0
        assert np.abs(e).max() <= error * (1 + 1e-4)
        assert e[0] == pytest.approx(-error, rel=1e-3)  # p(lower) < 1 at the left end
        assert e.max() == pytest.approx(error, rel=1e-3)  # and the overshoot reaches the same size

    def test_beats_newton_schulz_from_a_small_lower_end(self):
        coefficients, _ = minimax_odd_polynomial(1e-3, 1.0, 1)
        assert coefficients[0] > 1.5  # slope at 0: Newton-Schulz's is 1.5


class TestSchedules:
    @staticmethod
    def composed_error(schedule, grid: np.ndarray) -> float:
        s = grid.copy()
        for step in schedule.steps:
            s = step_map(step, s)
        return float(np.abs(s - 1.0).max())

    @pytest.mark.parametrize("lower", [3e-1, 2.5e-2, 6e-4])
    @pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-8])
    @pytest.mark.parametrize("kind", ["minimax", "backward", "pade"])
    def test_certificate_holds_on_a_dense_grid(self, lower, tol, kind):
        if kind == "pade":
            schedule = pade_schedule(lower, 1.0, tol, degree=2)
        else:
            degrees = BACKWARD_DEGREES if kind == "backward" else FORWARD_DEGREES
            schedule = minimax_schedule(lower, 1.0, tol, degrees=degrees, backward=kind == "backward")
        grid = np.concatenate([np.geomspace(lower, 1.0, 50_001), np.linspace(lower, 1.0, 50_001)])
        assert schedule.error <= tol
        assert self.composed_error(schedule, grid) <= schedule.error * (1 + 1e-4) + 1e-14

    @pytest.mark.parametrize("backward", [False, True])
    def test_minimax_steps_start_below_where_the_exchange_breaks_down(self, backward):
        # float64's rounding-level ridge puts the lower end near 2e-9; the exchange fails below ~1e-7.
        lower = 2e-9
        degrees = BACKWARD_DEGREES if backward else FORWARD_DEGREES
        schedule = minimax_schedule(lower, 1.0, 1e-3, degrees=degrees, backward=backward)
        grid = np.concatenate([np.geomspace(lower, 1.0, 50_001), np.linspace(lower, 1.0, 50_001)])
        assert schedule.error <= 1e-3
        assert self.composed_error(schedule, grid) <= schedule.error * (1 + 1e-4) + 1e-14

    @pytest.mark.parametrize("kind", ["minimax", "pade"])
    def test_gradient_certificate_bounds_divided_differences(self, kind):
        # The gradient's relative error in the eigenbasis is the divided difference of s P(s) (minus 1):
        # check the certificate against it at pairs of points, without the mean-value argument.
        lower = 6e-4
        if kind == "minimax":
            base = minimax_schedule(lower, 1.0, 1e-3)
        else:
            base = pade_schedule(lower, 1.0, 1e-3, degree=2)
        schedule = differentiable_schedule(base, 1e-3)
        s = np.geomspace(lower, 1.0, 20_001)
        value = s.copy()
        for step in schedule.steps:
            value = step_map(step, value)
        g = s * value
        for gap in (1, 7, 500):
            divided = (g[gap:] - g[:-gap]) / (s[gap:] - s[:-gap])
            # (+ 1e-10: float64 cancellation in the differences of nearby points)
            assert np.abs(divided - 1.0).max() <= gradient_error(schedule) * (1 + 1e-6) + 1e-10
        assert gradient_error(schedule) <= 1e-3
        assert schedule.error <= 1e-3

    def test_forward_error_alone_does_not_bound_the_gradient(self):
        schedule = minimax_schedule(6e-4, 1.0, 1e-3)
        assert schedule.error <= 1e-3 < 1.0 < gradient_error(schedule)  # an oscillating composition
        extended = differentiable_schedule(schedule, 1e-3)
        assert extended.steps[: len(schedule.steps)] == schedule.steps
        assert len(extended.steps) == len(schedule.steps) + 1  # one Newton-Schulz step flattens it

    def test_newton_schulz_schedule_reports_its_error(self):
        schedule = newton_schulz_schedule(0.1, 1.0, 3)
        grid = np.linspace(0.1, 1.0, 10_001)
        assert schedule.error == pytest.approx(self.composed_error(schedule, grid), rel=1e-6)
        assert schedule.error > 1e-2  # three steps from 0.1 are not enough

    def test_looser_tolerance_and_larger_spectrum_cost_fewer_products(self):
        def cost(lower, tol):
            return minimax_schedule(lower, 1.0, tol).forward_products()

        assert cost(0.03, 1e-2) < cost(0.03, 1e-8)
        assert cost(0.3, 1e-4) < cost(0.03, 1e-4) < cost(6e-4, 1e-4)

    @pytest.mark.skipif(
        not FAKE_CUDA_SUPPORTED, reason="fake CUDA tensors abort the process before torch 2.11"
    )
    def test_product_counts_are_the_products_made(self):
        from covpool.bench.trace import trace_root
        from covpool.linalg.options import RootOptions

        options = RootOptions(method="mtp")
        plan = plan_root(options, 32, eps=0.0, device=torch.device("cuda"), dtype=torch.float32)
        result = trace_root(lambda a: covpool.sqrtm(a, options), n=32, batch=4)
        # + 2 for the Schatten-8 normalisation (the default without a ridge), + 3 for the residual test.
        assert plan.normalization == "schatten8"
        assert result.forward.product_units == plan.forward.forward_products() + 5
        assert result.syncs == 0
        assert result.backward.product_units == plan.backward.backward_products()

        # A head's ridge: the fused unrolled backward.
        plan = plan_root(options, 32, eps=1e-4, device=torch.device("cuda"), dtype=torch.float32)
        assert (plan.gradient, plan.normalization) == ("adjoint", "trace")
        for function in (covpool.sqrtm, covpool.inv_sqrtm):
            result = trace_root(lambda a, f=function: f(a, options, eps=1e-4), n=32, batch=4)
            assert result.syncs == 0
            assert result.forward.product_units == plan.forward.forward_products() + 3  # the residual test
            assert result.backward.product_units == plan.forward.adjoint_products()
