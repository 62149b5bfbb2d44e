"""Certified schedules: the forward and backward schedules of a resolved method that hold ``tol``.

:func:`certify` is the part of planning that sizes a call's iterations: given the method the planner chose
(:mod:`covpool.linalg.planner`), the size, the ridge and the precision of the products, it bounds the
spectrum of the normalised matrix (``lower``), picks the normalisation and the kind of gradient, and
composes the cheapest schedules whose a-posteriori residual test certifies ``tol``
(:mod:`covpool.linalg.schedule`), or refuses with a ``ValueError`` that says what to change. The docs page
"How the schedules are certified" derives each rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from covpool.linalg.coefficients import pade_coefficients, taylor_coefficients
from covpool.linalg.emulation import EPSILON
from covpool.linalg.iteration import residual_rounding
from covpool.linalg.lyapunov import rounding_error
from covpool.linalg.mixed import MixedPlan, mixed_error_bound, mixed_plan, mixed_valid_residual
from covpool.linalg.options import DEFAULT_CONDITION, DEFAULT_TOL, RootOptions
from covpool.linalg.schedule import (
    BACKWARD_DEGREES,
    FORWARD_DEGREES,
    ResidualTest,
    Schedule,
    differentiable_schedule,
    minimax_schedule,
    newton_schulz_schedule,
    pade_schedule,
    passing_edge,
    residual_test,
    valid_residual,
)

Gradient = str
"""How a backward runs: ``"lyapunov"``, ``"adjoint"``, ``"autograd"`` or ``"eigh"`` (:data:`GRADIENTS`)."""
GRADIENTS = {
    "lyapunov": "the Lyapunov equation by the sign iteration (:mod:`covpool.linalg.lyapunov`): "
    "backward='minimax' (certified minimax steps) or 'newton-schulz' (the paper's plain steps)",
    "adjoint": "backward='unrolled' for mtp: the fused reverse mode of its polynomial steps "
    "(:mod:`covpool.linalg.unrolled`)",
    "autograd": "backward='unrolled' for mpa, and ns: autograd through the steps",
    "eigh": "method='eigh': the Daleckii-Krein formula (:mod:`covpool.linalg.eigh`)",
}
"""The one mapping from the options' ``backward`` (and method) to the gradient the code runs."""


@dataclass(frozen=True)
class Schedules:
    """What :func:`certify` decides for one call (the fields of :class:`covpool.linalg.planner.RootPlan`
    that size the iterations; see there)."""

    gradient: str
    normalization: str | None = None
    forward: Schedule | None = None
    direct_degree: int | None = None
    series: str | None = None
    backward: Schedule | None = None
    lower: float = 0.0
    check: ResidualTest | None = None
    mixed: MixedPlan | None = None


_NORMALIZATION_SLACK = {"schatten8": 0.125, "frobenius": 0.5, "trace": 1.0}
"""``c / λmax <= n^slack`` for the normalising constant ``c`` (Schatten-8 norm, Frobenius norm, trace)."""
_FLOAT_SLACK = 1e-4
"""Relative room left above the normalised spectrum for rounding."""
TRACE_ROUNDING = 0.25
"""Room left below the ridge's bound when the trace normalises, in machine epsilons of the working dtype:
rounding the input moves the smallest eigenvalue of ``A / tr A`` on float32 sample covariances, and with
the trace a rank-deficient input sits exactly on the bound. Measured by ``python
examples/studies/rounding.py``, recorded in ``examples/results/rounding.json`` (table ``input_rounding``,
column ``below_bound_in_u``; ``tests/test_studies.py`` holds it under this room). The Schatten-8 norm
keeps the exact bound: its constant lies below the trace for any input of rank > 1."""
_TRACE_BOUND_SHARE = 0.9
"""The trace normalises (saving the Schatten-8 norm's two products) where its bound is at least this share
of the Schatten-8 norm's."""
_VALID_SHARE = 0.5
"""A valid input's residual test (its Schatten-8 overestimate and rounding included) stays below this
share of the limit, where a forward target allows (``check`` in :func:`certify`)."""
CERTIFY_SLACK = 2.0
"""Where the spectrum bound is assumed, a plan whose residual test certifies more than this many times
``tol`` is refused (:func:`_refuse_uncertified`): the a-posteriori test is what keeps a matrix beyond the
bound from being silently wrong, and the beyond-bound grid is held to 2 ``tol``."""


def _lower_bound(normalization: str, n: int, eps: float, condition: float | None, room: float = 0.0) -> float:
    """Lower end of the spectrum of ``Â^(1/2)``: from the ridge less ``room``, else from the condition bound
    (assumed when there is no ridge); 0 where a ridge is given but does not clear ``room``."""
    from_condition = 1.0 / ((condition or DEFAULT_CONDITION) * n ** _NORMALIZATION_SLACK[normalization])
    # λmin(A + eps·m·I) >= eps·m and every normalising constant is <= tr(A + eps·m·I) = n·m·(1 + eps).
    from_ridge = eps / (n * (1.0 + eps)) - room if eps > 0 else 0.0
    if from_ridge > 0.0:
        x = max(from_ridge, from_condition) if condition is not None else from_ridge
    elif eps > 0 and condition is None:
        x = 0.0
    else:
        x = from_condition
    return math.sqrt(min(x, 1.0))


def _room(normalization: str, unit_roundoff: float) -> float:
    """What the bound leaves for the rounding of the input (:data:`TRACE_ROUNDING`; trace only)."""
    return TRACE_ROUNDING * unit_roundoff if normalization == "trace" else 0.0


def _default_normalization(n: int, eps: float, condition: float | None, unit_roundoff: float) -> str:
    """mtp/mpa's normalisation: the trace where its bound is nearly the Schatten-8 norm's, as it is where
    a ridge well above the rounding level sets the bound (both constants are at most ``tr(A + ridge)``);
    else the Schatten-8 norm, at two products: where the condition bound decides (``n^(7/8)`` times the
    trace's, 38× at n = 64) or the ridge is near the rounding level (ZCA's)."""
    trace = _lower_bound("trace", n, eps, condition, _room("trace", unit_roundoff))
    return (
        "trace"
        if trace**2 >= _TRACE_BOUND_SHARE * _lower_bound("schatten8", n, eps, condition) ** 2
        else "schatten8"
    )


def _direct_error(series: str, degree: int, lower: float) -> float:
    """Worst relative error of the single approximant of ``(1 - z)^(-1/2)`` times ``x`` on ``[lower², 1]``."""
    x = np.geomspace(lower**2, 1.0, 4000)
    z = 1.0 - x
    exponent = Fraction(-1, 2)
    if series == "taylor":
        approx = sum(float(c) * z**k for k, c in enumerate(taylor_coefficients(exponent, degree)))
    else:
        p, q = pade_coefficients(exponent, degree, degree)
        approx = sum(float(c) * z**k for k, c in enumerate(p)) / sum(float(c) * z**k for k, c in enumerate(q))
    return float(np.abs(approx * np.sqrt(x) - 1.0).max())


def certify(
    options: RootOptions, method: str, n: int, eps: float, unit_roundoff: float, precision: str
) -> Schedules:
    """The schedules of ``options`` for ``method`` (resolved from ``"auto"``) on matrices of size ``n``
    with relative ridge ``eps``, products of machine epsilon ``unit_roundoff`` at ``precision``
    (``"full"`` or ``"tf32"``, resolved by the planner).

    Raises:
        ValueError: no schedule certifies ``tol`` at this bound (the message says what to pass).
    """
    if method == "eigh":
        return Schedules(gradient="eigh")
    if method == "ns":
        normalization = options.normalization or "trace"
        lower = _lower_bound(normalization, max(n, 1), eps, None)
        forward = newton_schulz_schedule(lower, 1.0 + _FLOAT_SLACK, options.steps or 5)
        return Schedules(gradient="autograd", normalization=normalization, forward=forward, lower=lower)
    normalization = options.normalization or _default_normalization(
        max(n, 1), eps, options.condition, unit_roundoff
    )
    tol = options.tol or DEFAULT_TOL
    lower = _lower_bound(
        normalization, max(n, 1), eps, options.condition, _room(normalization, unit_roundoff)
    )
    if lower == 0.0:
        raise ValueError(
            f"normalization={normalization!r} certifies no spectrum bound with eps={eps:g} at n={n}: the "
            f"ridge is within the rounding of the input (machine epsilon {unit_roundoff:.2g}); pass a larger "
            "eps, a condition=, or leave normalization to its default"
        )
    if precision == "tf32":
        return _tf32_schedules(options, method, n, unit_roundoff, normalization, lower, tol)
    upper = 1.0 + _FLOAT_SLACK
    # a valid input's residual test: Schatten-8 overestimate of the largest |u - 1|, and rounding
    overestimate, noise = max(n, 1) ** 0.125, residual_rounding(method, max(n, 1), unit_roundoff, lower)

    def check(forward: Schedule, backward: Schedule | None) -> ResidualTest:
        floor = (overestimate * valid_residual(forward) + noise) / _VALID_SHARE
        return residual_test(forward, tol, backward=backward, floor=floor)

    def chosen_check(forward: Schedule, backward: Schedule | None) -> ResidualTest:
        """The chosen schedules' test; where the bound is assumed, a refusal if it cannot hold ``tol``."""
        test = check(forward, backward)
        if _assumed_bound(eps, options):
            _refuse_uncertified(test.certifies, tol, method, options.condition, unit_roundoff)
        return test

    def cheapest(candidates: list[tuple[Schedule, Schedule | None]]) -> tuple[Schedule, Schedule | None]:
        """The cheapest candidate whose residual test certifies ``tol`` (a valid input then passes it
        with room), else the one whose test certifies the least error."""

        def rank(pair: tuple[Schedule, Schedule | None]) -> tuple[float, int]:
            forward, backward = pair
            cost = forward.forward_products() + (backward.backward_products() if backward else 0)
            return max(check(forward, backward).certifies, tol), cost

        return min(candidates, key=rank)

    forward, direct_degree, series = None, None, None
    if options.steps == 1:
        direct_degree = options.degree or (5 if method == "mpa" else 8)
        series = "pade" if method == "mpa" else "taylor"
        forward_error = _direct_error(series, direct_degree, lower)
    else:
        forward = _forward_schedule(method, options, lower, upper, tol)
        forward_error = forward.error
    backward_kind = options.backward or (
        "minimax" if options.steps == 1 or rounding_error(lower, unit_roundoff) <= tol else "unrolled"
    )
    if backward_kind == "unrolled":
        if options.steps is None:  # tighter forward targets can need fewer flat steps: take the cheapest
            forward, _ = cheapest(
                _reachable(
                    lambda t: (
                        differentiable_schedule(_forward_schedule(method, options, lower, upper, t), tol),
                        None,
                    ),
                    (tol, tol / 10, tol / 100),
                    tol,
                )
            )
        return Schedules(
            gradient="autograd" if method == "mpa" else "adjoint",
            normalization=normalization,
            forward=forward,
            lower=lower,
            check=chosen_check(forward, None),
        )

    def lyapunov_schedule(forward: Schedule | None, forward_error: float, target: float) -> Schedule:
        """The sign iteration's schedule, on the spectrum of every computed root that passes the
        residual test (with a limit of ``tol``), so that the test sees every eigenvalue the backward
        does not cover; for the single approximant, on the assumed interval."""
        slack = min(max(forward_error, _FLOAT_SLACK), 0.5)
        lower_end = lower * (1.0 - slack)
        if forward is not None:
            lower_end = min(lower_end, passing_edge(forward, tol)[0] * (1.0 - _FLOAT_SLACK))
        upper_end = 1.0 + slack
        if backward_kind == "newton-schulz":
            return newton_schulz_schedule(lower_end, upper_end, options.backward_steps)
        return minimax_schedule(
            lower_end,
            upper_end,
            target,
            degrees=BACKWARD_DEGREES,
            backward=True,
            steps=options.backward_steps,
        )

    # The Lyapunov gradient solves with the computed roots, so the forward's error E enters it, once to
    # first order: in the eigenbasis Y = s P(s) and Z = P(s) / s share P, and either root's gradient is off
    # by a weighted mean of P_i - 1 and P_j - 1. The solver gets what tol leaves of the largest forward
    # error a passing matrix can have; the cheapest of a few forward targets whose residual test has room
    # is taken.
    if (
        forward is not None
        and options.steps is None
        and backward_kind == "minimax"
        and not options.backward_steps
    ):

        def split(target: float) -> tuple[Schedule, Schedule]:
            candidate = _forward_schedule(method, options, lower, upper, target)
            passing_error = passing_edge(candidate, tol)[1]
            return candidate, lyapunov_schedule(candidate, candidate.error, tol - passing_error)

        forward, backward = cheapest(_reachable(split, (tol / 2, tol / 5, tol / 20, tol / 100), tol))
    else:
        backward = lyapunov_schedule(forward, forward_error, max(tol - forward_error, tol / 2))
    test = chosen_check(forward, backward) if forward is not None else None
    return Schedules(
        gradient="lyapunov",
        normalization=normalization,
        forward=forward,
        direct_degree=direct_degree,
        series=series,
        backward=backward,
        lower=lower,
        check=test,
    )


MIXED_VALID_SHARE = 0.5
"""A ``"tf32"`` plan's modelled residual of a valid input (:func:`covpool.linalg.mixed.mixed_valid_residual`)
stays below this share of the test's limit (as :data:`_VALID_SHARE` for the float32 plans)."""


def _tf32_schedules(
    options: RootOptions,
    method: str,
    n: int,
    unit_roundoff: float,
    normalization: str,
    lower: float,
    tol: float,
) -> Schedules:
    """The ``"tf32"`` plan: :func:`covpool.linalg.mixed.mixed_plan` on the mtp plan's bound, certified by
    :func:`covpool.linalg.mixed.mixed_error_bound` and by a valid input's modelled residual within
    :data:`MIXED_VALID_SHARE` of the test's limit; that test passes a matrix whose estimated largest
    eigenvalue error (:func:`covpool.linalg.mixed.mixed_residual`) is below ``tol``, so a matrix
    beyond the bound is flagged rather than wrong (the refinements solve with the same sign factor as the
    gradient: where it has not converged on an eigenvalue, neither has that eigenvalue's refinement).

    Raises:
        ValueError: not mtp on float32 products, steps fixed, or the models do not certify ``tol`` at
            this bound.
    """
    chosen = {name: getattr(options, name) for name in ("steps", "backward", "backward_steps", "degree")}
    given = sorted(name for name, value in chosen.items() if value is not None)
    given += ["fused=True"] if options.fused else []
    problem = None
    if method != "mtp":
        problem = f"method={method!r} (the mixed plan is mtp's)"
    elif unit_roundoff != torch.finfo(torch.float32).eps:
        problem = "the input works in float64 (TF32 replaces float32 products only)"
    elif given:
        problem = (
            f"{', '.join(given)} given (the mixed plan chooses its own steps; the fused kernels run "
            "float32 products)"
        )
    if problem is None:
        plan = mixed_plan(lower, epsilon=EPSILON["tf32"])
        forward, gradient = mixed_error_bound(plan, n)
        valid = mixed_valid_residual(plan, n)
        if max(forward, gradient) <= tol and valid <= MIXED_VALID_SHARE * tol:
            return Schedules(
                gradient="lyapunov",
                normalization=normalization,
                forward=plan.forward,
                backward=plan.sign,
                lower=lower,
                check=ResidualTest(tol, tol, valid),
                mixed=plan,
            )
        problem = (
            f"its models give forward {forward:.2g}, gradient {gradient:.2g} and a valid input's residual "
            f"{valid:.2g} (at most {MIXED_VALID_SHARE:g} tol) at this bound"
            if math.isfinite(forward)
            else f"the spectrum bound (κ up to about {1 / lower**2:.2g} after normalising) or n={n} lies "
            "outside what its model was fitted on"
        )
    raise ValueError(
        f"precision='tf32' cannot be planned for tol={tol:g}: {problem}; pass precision='full'"
        + (", a larger tol, a smaller condition= or a larger eps" if "models" in problem else "")
    )


def _assumed_bound(eps: float, options: RootOptions) -> bool:
    """Whether the plan answers for ``tol`` on a spectrum bound that is the caller's promise
    (``condition``, or the default one without a ridge) rather than a ridge the root adds itself: only
    then can an input lie beyond it. Fixed ``steps`` or ``backward_steps`` are the caller's schedule, not
    a plan for ``tol``."""
    chosen = options.steps is None and options.backward_steps is None
    return chosen and (eps <= 0.0 or options.condition is not None)


def _refuse_uncertified(
    certifies: float, tol: float, method: str, condition: float | None, unit_roundoff: float
) -> None:
    """Raise where the residual test cannot hold a matrix beyond the assumed bound to ``tol``: what it
    certifies, widened by the products' rounding at that condition, is more than :data:`CERTIFY_SLACK`
    times ``tol`` (float32 at condition 1e6: every method's gradient is off by about u·κ)."""
    if certifies <= CERTIFY_SLACK * tol:
        return
    raise ValueError(
        f"tol={tol:g} cannot be certified for method={method!r} at condition="
        f"{condition or DEFAULT_CONDITION:g} in products of machine epsilon {unit_roundoff:.2g}: the "
        f"rounding there leaves results the residual test can only hold to {certifies:.2g}; pass "
        f"tol >= {certifies / CERTIFY_SLACK:.2g}, a smaller condition, or float64 input"
    )


def _reachable(make: Callable[[float], Any], targets: tuple[float, ...], tol: float) -> list[Any]:
    """``make(target)`` for each target it can reach (a tighter target can be beyond reach near the
    dtype's rounding level); a ``ValueError`` naming ``tol`` if none is."""
    made = []
    for target in targets:
        try:
            made.append(make(target))
        except ValueError:
            continue
    if not made:
        raise ValueError(f"tol={tol:g} cannot be certified: no schedule reaches it; pass a larger tol")
    return made


def _forward_schedule(method: str, options: RootOptions, lower: float, upper: float, tol: float) -> Schedule:
    if method == "mpa":
        return pade_schedule(lower, upper, tol, degree=options.degree or 2, steps=options.steps)
    degrees = (options.degree,) if options.degree else FORWARD_DEGREES
    return minimax_schedule(lower, upper, tol, degrees=degrees, steps=options.steps)
