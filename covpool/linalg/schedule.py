"""Certified schedules: which steps the coupled iterations take, and the error they are guaranteed to reach.

All iterations in covpool act on the eigenvalues ``s`` of ``Â^(1/2)`` one by one, through a scalar map
``s ↦ s · q(s²)`` per step:

- the coupled forward iteration ``U = Z Y``, ``Y ← Y q(U)``, ``Z ← q(U) Z`` (``Y₀ = Â``, ``Z₀ = I``) keeps
  ``Y = Â^(1/2) S``, ``Z = Â^(-1/2) S`` where ``S`` collects the composed maps, so the relative error of every
  eigenvalue of ``Y`` and ``Z`` is ``|s_K - 1|``;
- the Lyapunov backward (:mod:`covpool.linalg.lyapunov`) applies the same kind of maps to the block matrix
  ``[[B, C], [0, -B]]`` with ``B₀ = Â^(1/2)``; its off-diagonal block ends as
  ``C_ij (P(b_i) + P(b_j)) / (b_i + b_j)`` for the composed map ``P``, so if ``P`` maps the spectrum into
  ``[1 - E, 1 + E]`` the gradient's relative error is at most ``E`` as well.

So if the spectrum of ``Â^(1/2)`` lies in ``[lower, 1]``, tracking that interval through the scalar maps
bounds the error of forward and gradient *before* anything is computed: a schedule is chosen on the host,
from ``lower`` and ``tol`` alone, and its step count is fixed, so nothing is read back from the device.

Three kinds of step:

- **minimax polynomial** steps (``mtp`` and every backward): on the current interval ``[a, b]`` the odd
  polynomial of degree ``2d + 1`` closest to 1 (:func:`covpool.linalg.coefficients.minimax_odd_polynomial`)
  maps it onto ``[1 - E, 1 + E]``. From a small ``a`` its slope reaches about 8.5 (degree 5) where the
  Newton-Schulz step's is 1.5, so far fewer steps are needed.
- **scaled Padé** steps (``mpa``): ``q(u) = μ P(1 - μ²u) / Q(1 - μ²u)`` with the diagonal Padé approximant
  ``P/Q`` of ``(1 - w)^(-1/2)`` and ``μ = 1/√(ab)``; the step commutes with ``s ↦ 1/s`` up to inversion, so
  that scaling balances both ends of the interval. ``μ`` is capped at 2: a larger one makes the
  denominator ``Q(1 - μ²U)`` so ill-conditioned that its float32 Cholesky solve fails (``μ = 28`` does at
  condition 6e5, and μ = 4 loses a digit of the gradient at condition 1e5 in float32).
- **Newton-Schulz** steps ``q(u) = (3 - u) / 2``: iSQRT-COV's forward and the paper's backward.

Products per step (``n × n`` matrix products): forward ``d + 2`` for a polynomial of degree ``d`` (``U``,
``d - 1`` for ``q(U)``, the two updates; the first step ``d``), backward ``2d + 3`` for ``d <= 2``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from covpool.linalg.coefficients import minimax_odd_polynomial, pade_coefficients
from covpool.linalg.polynomial import best_block, product_count

NEWTON_SCHULZ = (1.5, -0.5)
"""``q(u) = (3 - u) / 2``: the Newton-Schulz step, ``s ↦ s (3 - s²) / 2``."""
FORWARD_DEGREES = (1, 2, 3, 4)
BACKWARD_DEGREES = (1, 2)
MAX_STEPS = 40
SAFETY = 0.01
"""Room above each minimax step's interval, relative to its width, for rounding (:func:`_minimax_step`)."""
_CONVERGED = 1e-12
MAX_PADE_SCALE = 2.0
MAX_FLAT_STEPS = 4


@dataclass(frozen=True)
class PolynomialStep:
    """``q(u) = Σ_j coefficients[j] u^j``."""

    coefficients: tuple[float, ...]

    @property
    def degree(self) -> int:
        return len(self.coefficients) - 1


@dataclass(frozen=True)
class PadeStep:
    """``q(u) = scale · P(w) / Q(w)`` at ``w = 1 - scale² u`` (coefficients of ``P`` and ``Q`` in ``w``)."""

    scale: float
    numerator: tuple[float, ...]
    denominator: tuple[float, ...]

    @property
    def degree(self) -> int:
        return len(self.numerator) - 1


Step = PolynomialStep | PadeStep


@dataclass(frozen=True)
class Schedule:
    """Steps of a coupled or sign iteration with the interval they were certified on.

    Attributes:
        steps: the steps, in order.
        lower: left end of the interval of ``s`` (eigenvalues of ``Â^(1/2)``) assumed at the start.
        upper: right end of that interval.
        error: ``max |s_K - 1|`` over the interval after all steps: the certified relative error.
    """

    steps: tuple[Step, ...]
    lower: float
    upper: float
    error: float

    def forward_products(self) -> int:
        """Matrix products of the coupled forward iteration.

        A polynomial step of degree ``d`` takes ``U = Z Y``, ``d - 1`` for ``q(U)`` and one for each of the
        updates of ``Y`` and ``Z``: ``d + 2``; the first, with ``U = Â`` and ``Z = q(Â)``, only ``d``.
        """
        total = 0
        for k, step in enumerate(self.steps):
            if isinstance(step, PolynomialStep):
                total += step.degree + (0 if k == 0 else 2)
            else:
                total += _polynomial_products(step.degree) + (1 if k == 0 else 3)
        return total

    def backward_products(self) -> int:
        """Matrix products of the Lyapunov sign iteration with these (polynomial) steps."""
        return sum(2 * step.degree + 3 for step in self.steps)

    def adjoint_products(self) -> int:
        """Matrix products of the unrolled backward (:mod:`covpool.linalg.unrolled`) of these steps.

        ``2 d + 4`` per step (``2 d`` for the first), less 2 at the last step, where only one of ``Y``,
        ``Z`` receives a gradient.
        """
        return sum(2 * step.degree + (0 if k == 0 else 4) for k, step in enumerate(self.steps)) - 2


def _polynomial_products(degree: int) -> int:
    return product_count(degree, 2, best_block(degree, 2))


def _polynomial(coefficients: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    return sum(c * x**j for j, c in enumerate(coefficients))


def _polynomial_slope(coefficients: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    return sum(j * c * x ** (j - 1) for j, c in enumerate(coefficients) if j > 0)


def step_map(step: Step, s: np.ndarray) -> np.ndarray:
    """The scalar map ``s ↦ s · q(s²)`` of one step, in float64."""
    u = s * s
    if isinstance(step, PolynomialStep):
        return s * _polynomial(step.coefficients, u)
    w = 1.0 - step.scale**2 * u
    return s * step.scale * _polynomial(step.numerator, w) / _polynomial(step.denominator, w)


def step_map_and_slope(step: Step, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`step_map` and its derivative ``d/ds`` at ``s``, in float64, each polynomial evaluated once."""
    u = s * s
    if isinstance(step, PolynomialStep):
        q, dq_du = _polynomial(step.coefficients, u), _polynomial_slope(step.coefficients, u)
    else:
        w = 1.0 - step.scale**2 * u
        numerator, denominator = _polynomial(step.numerator, w), _polynomial(step.denominator, w)
        dq_dw = (
            _polynomial_slope(step.numerator, w) * denominator
            - numerator * _polynomial_slope(step.denominator, w)
        ) / denominator**2
        q, dq_du = step.scale * numerator / denominator, -(step.scale**3) * dq_dw
    # d/ds [s q(s²)] = q + 2 s² q'(s²)
    return s * q, q + 2.0 * u * dq_du


def composed_map(schedule: Schedule, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The composed scalar map ``P(s)`` of all steps and its slope ``P'(s)``, in float64."""
    value, slope = s, np.ones_like(s)
    for step in schedule.steps:
        value, step_slope = step_map_and_slope(step, value)
        slope = step_slope * slope
    return value, slope


def gradient_error(schedule: Schedule) -> float:
    """Certified relative error of the gradient when the iteration itself is differentiated.

    Differentiating the computed steps (``backward="unrolled"``) gives the exact gradient of the computed
    function ``Â ↦ Â^(1/2) P(Â^(1/2))``, where ``P`` is the composed scalar map. In the eigenbasis its
    first divided differences, relative to those of the exact root, equal divided differences of
    ``s P(s)`` (``P(s) / s`` for the inverse root, in ``1 / s``), so the mean-value theorem bounds the
    gradient's relative error by ``max |P(s) - 1| + max |s P'(s)|`` over the interval. The forward error
    alone does not bound it: a minimax composition oscillates around 1 and its slope can exceed its
    error a thousandfold.

    Evaluated on a dense geometric grid, with ``P'`` by the chain rule.
    """
    s = np.geomspace(schedule.lower, schedule.upper, 200_001)
    value, slope = composed_map(schedule, s)
    return float(np.abs(value - 1.0).max() + np.abs(s * slope).max())


def image(step: Step, lower: float, upper: float) -> tuple[float, float]:
    """``(min, max)`` of :func:`step_map` over ``[lower, upper]`` (dense geometric and uniform grid)."""
    grid = np.concatenate([np.geomspace(lower, upper, 100_000), np.linspace(lower, upper, 100_000)])
    values = step_map(step, grid)
    return float(values.min()), float(values.max())


def _minimax_step(a: float, b: float, degree: int) -> tuple[PolynomialStep, tuple[float, float]]:
    """The minimax step for ``[a, b]`` and the interval it maps to; Newton-Schulz once converged.

    The polynomial is designed on ``[a, b + SAFETY (b - a)]``: a minimax step rises steeply just past its
    interval (slope about 26 at the top of the first degree-5 step), so an eigenvalue that rounding has
    pushed slightly above ``b`` would otherwise be amplified step after step (seen in float32: a whitening
    matrix's top eigenvalue 1.3e-4 above its bound diverged by the sixth backward step). The room scales
    with the interval's width: near convergence the steps are flat at the top and amplify nothing.

    Once the interval is within rounding of 1, the minimax problem degenerates (its reference points
    coincide), and any step that fixes 1 to second order keeps it there: Newton-Schulz does.

    Below about ``a = 1e-7`` the exchange breaks down at every degree (float64 ridges at the rounding
    level, ZCA's, reach 1e-9). There the step is designed on ``[a', b]`` for the smallest ``a' = a · 10^k``
    where it succeeds, and the interval it maps to is its image of ``[a, b]``: the polynomial is odd and
    increasing from 0 to ``a'`` (slope about 8.4 at 0), so ``[a, a']`` goes to ``[p(a), 1 - error]``.
    """
    if b - a < _CONVERGED:
        step = PolynomialStep(NEWTON_SCHULZ)
        return step, image(step, a, b)
    top = b + SAFETY * (b - a)
    design = a
    while design < b:
        for trial in range(degree, 0, -1):  # a high degree can break down on a tiny a; a lower one will not
            try:
                coefficients, error = minimax_odd_polynomial(design, top, trial)
            except ArithmeticError:
                continue
            if error < 1.0:
                step = PolynomialStep(coefficients)
                if design == a:
                    return step, (1.0 - error, 1.0 + error)
                return step, (float(step_map(step, np.array([a]))[0]), 1.0 + error)
        design *= 10.0
    raise ArithmeticError(f"no minimax step of degree <= {degree} on [{a:g}, {b:g}]")


def _finish(steps: list[Step], lower: float, upper: float, a: float, b: float) -> Schedule:
    return Schedule(tuple(steps), lower, upper, max(1.0 - a, b - 1.0))


@functools.cache
def minimax_schedule(
    lower: float,
    upper: float,
    tol: float,
    *,
    degrees: tuple[int, ...] = FORWARD_DEGREES,
    backward: bool = False,
    steps: int | None = None,
) -> Schedule:
    """Cheapest sequence of minimax polynomial steps taking ``[lower, upper]`` to within ``tol`` of 1.

    For each candidate main degree, steps of that degree are taken until one step of the cheapest degree
    in ``degrees`` can finish within ``tol``; the schedule with the fewest products (forward or
    ``backward`` count) wins. With ``steps`` given, exactly that many steps of ``max(degrees)`` are taken
    and ``error`` says what they reach.
    """
    cost = (lambda d: 2 * d + 3) if backward else (lambda d: d + 2)
    if steps is not None:
        a, b, chosen = lower, upper, []
        for _ in range(steps):
            step, (a, b) = _minimax_step(a, b, max(degrees))
            chosen.append(step)
        return _finish(chosen, lower, upper, a, b)
    best: tuple[int, Schedule] | None = None
    for main in degrees:
        a, b, chosen, total = lower, upper, [], 0
        try:
            for _ in range(MAX_STEPS):
                finishing = None
                for degree in sorted(d for d in degrees if d <= main):
                    step, interval = _minimax_step(a, b, degree)
                    if max(1.0 - interval[0], interval[1] - 1.0) <= tol:
                        finishing = (step, interval)
                        break
                step, (a, b) = finishing or _minimax_step(a, b, main)
                chosen.append(step)
                total += cost(step.degree)
                if finishing is not None:
                    break
        except ArithmeticError:
            continue
        schedule = _finish(chosen, lower, upper, a, b)
        if schedule.error <= tol and (best is None or total < best[0]):
            best = (total, schedule)
    if best is None:
        raise ValueError(f"tol={tol} cannot be reached in {MAX_STEPS} steps")
    return best[1]


@functools.cache
def pade_schedule(
    lower: float, upper: float, tol: float, *, degree: int, steps: int | None = None
) -> Schedule:
    """Scaled Padé steps from ``[lower, upper]`` to within ``tol`` of 1 (or ``steps`` of them)."""
    numerator, denominator = (
        tuple(float(c) for c in table) for table in pade_coefficients(Fraction(-1, 2), degree, degree)
    )
    a, b, chosen = lower, upper, []
    for _ in range(MAX_STEPS if steps is None else steps):
        step = PadeStep(min(1.0 / math.sqrt(a * b), MAX_PADE_SCALE), numerator, denominator)
        chosen.append(step)
        a, b = image(step, a, b)
        if steps is None and max(1.0 - a, b - 1.0) <= tol:
            break
    return _finish(chosen, lower, upper, a, b)


@functools.cache
def newton_schulz_schedule(lower: float, upper: float, steps: int) -> Schedule:
    """``steps`` Newton-Schulz steps and the error they reach from ``[lower, upper]``."""
    step = PolynomialStep(NEWTON_SCHULZ)
    a, b = lower, upper
    for _ in range(steps):
        a, b = image(step, a, b)
    return _finish([step] * steps, lower, upper, a, b)


@functools.cache
def differentiable_schedule(schedule: Schedule, tol: float) -> Schedule:
    """``schedule`` followed by flat steps until :func:`gradient_error` is within ``tol``.

    A flat step fixes 1 to high order, so it shrinks the slope of the composition near 1 as well as its
    error: a Newton-Schulz step maps a slope ``σ`` at error ``e`` to about ``3 e σ``, and the error to
    ``1.5 e²``; for Padé iterations, one more scaled Padé step.
    """
    steps, a, b = list(schedule.steps), 1.0 - schedule.error, 1.0 + schedule.error
    for _ in range(MAX_FLAT_STEPS + 1):
        candidate = Schedule(tuple(steps), schedule.lower, schedule.upper, max(1.0 - a, b - 1.0))
        if gradient_error(candidate) <= tol:
            return candidate
        last = steps[-1]
        step = (
            PadeStep(min(1.0 / math.sqrt(a * b), MAX_PADE_SCALE), last.numerator, last.denominator)
            if isinstance(last, PadeStep)
            else PolynomialStep(NEWTON_SCHULZ)
        )
        steps.append(step)
        a, b = image(step, a, b)
    raise ValueError(f"no gradient within tol={tol} after {MAX_FLAT_STEPS} flat steps")


_RESIDUAL_GRID = np.geomspace(1e-10, 1.0, 30_001)


@functools.cache
def _curve(forward: Schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(s, P(s), P'(s))`` on a grid from 1e-10 (κ = 1e20) to the schedule's upper end, dense on its
    interval (cached: a plan tests several candidates against the same forward)."""
    s = np.concatenate([_RESIDUAL_GRID, np.linspace(forward.lower, forward.upper, 10_001)])
    s = np.unique(s[s <= forward.upper])
    return (s, *composed_map(forward, s))


def valid_residual(forward: Schedule) -> float:
    """The largest ``|P(s)² - 1|`` over the schedule's interval: a valid input's residual."""
    s, value, _ = _curve(forward)
    return float(np.abs(value * value - 1.0)[s >= forward.lower].max())


@dataclass(frozen=True)
class ResidualTest:
    """The a-posteriori test of a result: a matrix passes when the eigenvalues ``u_i = P(s_i)²`` of
    ``U = Z Y`` all satisfy ``|u_i - 1| < limit``.

    Attributes:
        limit: the test's bound on ``max_i |u_i - 1|``.
        certifies: relative error of forward and gradient that any passing matrix is within, wherever its
            spectrum lies (to first order, in exact arithmetic).
        valid_residual: the largest ``|u - 1|`` an input inside the schedule's interval gives.
    """

    limit: float
    certifies: float
    valid_residual: float


def passing_edge(forward: Schedule, limit: float) -> tuple[float, float]:
    """``(y, e)``: the smallest eigenvalue ``y = s P(s)`` of the computed root that a matrix passing the
    residual test with ``limit`` can have, and the largest forward error ``|P(s) - 1|`` it can have. A
    Lyapunov backward certified down to ``y`` covers every matrix that passes."""
    s, value, _ = _curve(forward)
    passing = np.abs(value * value - 1.0) < limit
    if not passing.any():
        raise ValueError(f"no eigenvalue passes a residual test with limit {limit:g}")
    return float((s * value)[passing].min()), float(np.abs(value - 1.0)[passing].max())


def residual_test(
    forward: Schedule, tol: float, *, backward: Schedule | None, floor: float = 0.0
) -> ResidualTest:
    """The residual test that certifies ``tol`` (or, for a fixed schedule that misses ``tol``, what it
    reaches on its interval), its limit raised to at least ``floor``.

    The error at an eigenvalue ``s`` of ``Â^(1/2)``, wherever it lies, is known from the scalar maps: the
    forward's ``|P(s) - 1|``; the Lyapunov gradient's adds the sign map's ``|B(y) - 1|`` at the computed
    root's eigenvalue ``y = s P(s)`` (``backward``); the unrolled gradient's (``backward=None``) adds
    ``|s P'(s)|`` (:func:`gradient_error`). With ``E(a)`` the sum of their maxima over ``[a, upper]``, the
    limit is the smallest ``|P(s)² - 1|`` over the ``s`` where ``E(s)`` exceeds the target: a matrix whose
    every ``|u_i - 1|`` is below it has no eigenvalue there. Below the interval ``P`` rises from 0 (every
    step is increasing there), so the limit is about ``2 |P(a) - 1|`` at the edge ``a`` of the target.
    ``floor`` (the rounding a valid input's test sees) can only widen the limit; ``certifies`` then says
    what the wider test still guarantees.
    """
    s, value, slope = _curve(forward)
    extra = np.abs(s * slope) if backward is None else np.abs(composed_map(backward, s * value)[0] - 1.0)
    # maxima over [s, upper], cumulative from the right
    worst = np.maximum.accumulate(np.abs(value - 1.0)[::-1])[::-1] + np.maximum.accumulate(extra[::-1])[::-1]
    inside = s >= forward.lower
    target = max(tol, float(worst[inside][0]) * (1.0 + 1e-9))
    residual = np.abs(value * value - 1.0)
    beyond = residual[worst > target]
    limit = max(min(float(beyond.min()) if beyond.size else 1.0, 1.0), floor)
    passing = residual < limit
    certifies = float(worst[int(np.argmax(passing))]) if passing.any() else math.inf
    return ResidualTest(limit, certifies, valid_residual(forward))
