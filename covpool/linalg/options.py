"""Options of the matrix roots: one object with the defaults, the validation and the resolution of a call.

:class:`RootOptions` is what every layer, model and config passes, unchanged, down to
:func:`covpool.sqrtm` / :func:`covpool.inv_sqrtm`. It is validated when it is built (on the host, the same on
every device): a value out of range, or an option the chosen method does not use, raises at once.
:meth:`RootOptions.plan` resolves it for one call (size, batch, device, dtype and the call's ridge) into a
:class:`RootPlan`: the concrete method, normalisation and the certified schedules of forward and backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch

from covpool.checks import check_choice, check_float, check_positive_int, reads_values
from covpool.linalg.auto import choose_method
from covpool.linalg.coefficients import pade_coefficients, taylor_coefficients
from covpool.linalg.emulation import EPSILON
from covpool.linalg.iteration import MIXED_TEST_PRODUCTS, RESIDUAL_TEST_PRODUCTS, residual_rounding
from covpool.linalg.lyapunov import rounding_error
from covpool.linalg.mixed import MixedPlan, mixed_error_bound, mixed_plan, mixed_valid_residual
from covpool.linalg.precision import PRECISIONS, Precision, modelled_time, resolve_precision
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
from covpool.numerics import is_tracing

Method = Literal["auto", "mtp", "mpa", "ns", "eigh"]
Normalization = Literal["schatten8", "frobenius", "trace"]
Backward = Literal["minimax", "newton-schulz", "unrolled"]
METHODS: tuple[str, ...] = ("auto", "mtp", "mpa", "ns", "eigh")
NORMALIZATIONS: tuple[str, ...] = ("schatten8", "frobenius", "trace")
BACKWARDS: tuple[str, ...] = ("minimax", "newton-schulz", "unrolled")

DEFAULT_TOL = 1e-3
DEFAULT_CONDITION = 1e3
_SERIES_OPTIONS = frozenset(
    {
        "tol",
        "condition",
        "degree",
        "steps",
        "normalization",
        "backward",
        "backward_steps",
        "precision",
        "fused",
        "check_input",
    }
)
_USED_BY = {
    "auto": frozenset({"tol", "condition", "precision", "fused", "check_input"}),
    "mtp": _SERIES_OPTIONS,
    "mpa": _SERIES_OPTIONS,
    "ns": frozenset({"steps", "normalization", "precision", "check_input"}),
    "eigh": frozenset({"precision", "check_input"}),
}
_NORMALIZATION_SLACK = {"schatten8": 0.125, "frobenius": 0.5, "trace": 1.0}
"""``c / λmax <= n^slack`` for the normalising constant ``c`` (Schatten-8 norm, Frobenius norm, trace)."""
_FLOAT_SLACK = 1e-4
"""Relative room left above the normalised spectrum for rounding."""
TRACE_ROUNDING = 0.25
"""Room left below the ridge's bound when the trace normalises, in machine epsilons of the working dtype:
rounding the input moves the smallest eigenvalue of ``A / tr A`` by up to 0.17 ε on float32 sample
covariances (n = 16 … 512, 8 or 49 positions; ``python -m covpool.bench --rounding`` prints it,
``tests/test_linalg_roots.py`` checks the bound), and with the trace a rank-deficient input sits exactly on
the bound. The Schatten-8 norm keeps the exact bound: its
constant lies below the trace for any input of rank > 1, which leaves that room in practice."""
_TRACE_BOUND_SHARE = 0.9
"""The trace normalises (saving the Schatten-8 norm's two products) where its bound is at least this share
of the Schatten-8 norm's."""
_VALID_SHARE = 0.5
"""A valid input's residual test (its Schatten-8 overestimate and rounding included) stays below this
share of the limit, where a forward target allows (``check`` in :func:`_plan`)."""
CERTIFY_SLACK = 2.0
"""Where the spectrum bound is assumed, a plan whose residual test certifies more than this many times
``tol`` is refused (:func:`_refuse_uncertified`): the a-posteriori test is what keeps a matrix beyond the
bound from being silently wrong, and the beyond-bound grid is held to 2 ``tol``."""
TOL_FLOOR = 8
"""Smallest ``tol`` accepted, in machine epsilons of the working dtype (9.5e-7 in float32, 1.8e-15 in
float64): below it the products' rounding, not the schedule, sets the error."""


@dataclass(frozen=True)
class RootPlan:
    """How one call is computed: the resolved method and its certified schedules.

    Attributes:
        method: ``"mtp"``, ``"mpa"``, ``"ns"`` or ``"eigh"``.
        normalization: how ``A`` is scaled before an iteration (None for eigh).
        forward: schedule of the coupled iteration (None for eigh and for a single approximant).
        direct_degree: degree of the paper's single approximant when ``steps == 1``, else None.
        series: that approximant's series, ``"taylor"`` (mtp) or ``"pade"`` (mpa), else None. A field,
            not a property: traced code reads only fields of the plan (dynamo cannot call a property of
            the constant plan an autograd function is passed).
        backward: schedule of the Lyapunov sign iteration (mtp and mpa), else None (see ``gradient``).
        lower: assumed lower end of the spectrum of ``Â^(1/2)``.
        check: the a-posteriori test of every result (mtp and mpa iterations; None for the single
            approximant, ns and eigh, which have checks of their own).
        precision: the precision of the products the schedules are certified for, ``"full"`` or
            ``"tf32"`` (:mod:`covpool.linalg.precision`).
        read_values: read validity flags on the host and raise (``check_input`` resolved).
        gradient: how the backward runs: ``"lyapunov"`` (:mod:`covpool.linalg.lyapunov`), ``"adjoint"``
            (the fused reverse mode of polynomial steps, :mod:`covpool.linalg.unrolled`), ``"autograd"``
            (ns, and unrolled Padé steps) or ``"eigh"``.
        fused: run the iteration and the Lyapunov solve in the fused Triton kernels where they apply
            (:mod:`covpool.kernels.dispatch` decides where).
        mixed: the mixed-precision plan that a ``"tf32"`` plan runs instead of ``forward`` and ``backward``
            (:mod:`covpool.linalg.mixed`; ``forward`` and ``backward`` then hold its two schedules), else
            None.
    """

    method: str
    normalization: str | None
    forward: Schedule | None
    direct_degree: int | None
    series: str | None
    backward: Schedule | None
    lower: float
    check: ResidualTest | None
    precision: str
    read_values: bool
    gradient: str
    fused: bool = False
    mixed: MixedPlan | None = None

    def products(self) -> int | None:
        """Matrix products of forward and backward as planned, without the normalisation's (two for the
        Schatten-8 norm, none for the trace) and the residual test's (three; eight for a mixed plan); None
        where autograd or eigh differentiates. A mixed plan's low-precision and float32 products together
        (:meth:`covpool.linalg.mixed.MixedPlan.products` has them apart)."""
        if self.mixed is not None:
            return sum(self.mixed.products())
        if self.gradient == "lyapunov":
            forward = self.forward.forward_products() if self.forward is not None else 0
            return forward + self.backward.backward_products()
        if self.gradient == "adjoint":
            return self.forward.forward_products() + self.forward.adjoint_products()
        return None


@dataclass(frozen=True)
class RootOptions:
    """Options of :func:`covpool.sqrtm` and :func:`covpool.inv_sqrtm`; every field is optional.

    Args:
        method: ``"auto"`` (default: ``"eigh"`` on CPU, where it is measured fastest; ``"mtp"`` on CUDA and
            while tracing), ``"mtp"`` (coupled minimax-polynomial iteration, matrix products only, Lyapunov
            backward), ``"mpa"`` (coupled scaled Padé iteration with Cholesky solves, Lyapunov backward),
            ``"ns"`` (iSQRT-COV's Newton-Schulz iteration, autograd through the steps), ``"eigh"``
            (eigendecomposition, exact Daleckii-Krein backward).
        tol: relative error of forward and gradient that mtp/mpa schedules are certified for (default 1e-3;
            for the gradient, to first order in the forward's error).
        condition: assumed bound on ``κ(A)`` when the call adds no ridge (``eps == 0``; default 1e3). With
            a ridge the bound follows from it and ``condition`` only tightens it.
        degree: polynomial degree of each mtp step (default: the cheapest for ``tol``) or Padé degree of
            each mpa step (default 2).
        steps: fixed number of forward steps instead of the certified count; ``1`` is the paper's single
            Taylor (mtp) or Padé (mpa) approximant. ns: its iterations (default 5).
        normalization: ``"schatten8"`` (``(tr A⁸)^(1/8)``, within ``n^(1/8)`` of ``λmax``, two products),
            ``"frobenius"`` (the paper's) or ``"trace"`` (iSQRT-COV's). Default for mtp/mpa: the trace
            where a ridge well above the rounding level bounds the spectrum (there it certifies nearly
            the same lower end, less room for rounding, and saves two products), else ``"schatten8"``;
            for ns the trace.
        backward: mtp/mpa only. ``"minimax"``: the Lyapunov equation solved by certified minimax sign
            steps; ``"newton-schulz"``: the paper's plain sign iteration (needs ``backward_steps``);
            ``"unrolled"``: reverse mode through the forward steps (a fused adjoint for mtp, autograd for
            mpa), which are then extended until the gradient of what they compute is certified within
            ``tol`` (see :func:`covpool.linalg.schedule.gradient_error`); it keeps every iterate for the
            backward, as ns does. Default: ``"minimax"`` where its rounding error in the working dtype
            (:func:`covpool.linalg.lyapunov.rounding_error`) is within ``tol``, else ``"unrolled"``: in
            float32 the Lyapunov gradient loses up to about ``0.04 u κ(A)`` (``u`` = 1.2e-7), 1e-3 at
            ``κ ≈ 2e5``, which a covariance head's ridge allows.
        backward_steps: fixed number of backward steps instead of the certified count.
        precision: precision of the matrix products (:mod:`covpool.linalg.precision`). ``"full"``
            (default): the working dtype's own, IEEE float32 or float64, whatever torch's global matmul
            setting. ``"tf32"`` (mtp, float32): the bulk of the iteration and of the Lyapunov solve in
            TF32 products with float32 refinements (:mod:`covpool.linalg.mixed`), certified by a model
            fitted on emulated runs up to about condition 1e4 (``tol=1e-3``) and refused beyond; on CPU
            the TF32 products are emulated, for checking. ``"auto"``: ``"tf32"`` on float32 CUDA
            matrices where it is certified and its products are modelled faster at the H200's measured
            TF32/float32 product times (n = 512 at condition 1e3;
            :func:`covpool.linalg.precision.modelled_time`), else
            ``"full"``. Where ``method="auto"`` takes eigh, no precision applies. Not the default until
            measured on a GPU.
        fused: run the forward iteration and the Lyapunov backward in one fused Triton kernel each
            where they apply (CUDA float32, ``n <= 64``, the Lyapunov backward; :mod:`covpool.kernels`).
            Default None: off, the plain-torch path, until the kernels are measured on a GPU (they are
            tested against that path on CPU through Triton's interpreter only).
        check_input: read validity on the host and raise on bad input (default None: yes where that needs
            no device synchronisation, i.e. off CUDA and outside tracing). Invalid matrices give NaN either
            way.

    Example:
        >>> RootOptions(method="mtp", tol=1e-4).method
        'mtp'
        >>> RootOptions(method="eigh", steps=3)
        Traceback (most recent call last):
        ...
        ValueError: steps is not used by method='eigh' (it uses: check_input, precision); remove it
    """

    method: Method = "auto"
    tol: float | None = None
    condition: float | None = None
    degree: int | None = None
    steps: int | None = None
    normalization: Normalization | None = None
    backward: Backward | None = None
    backward_steps: int | None = None
    precision: Precision | None = None
    fused: bool | None = None
    check_input: bool | None = None

    def __post_init__(self) -> None:
        check_choice(self.method, "method", METHODS)
        given = {f.name for f in fields(self) if f.name != "method" and getattr(self, f.name) is not None}
        unused = sorted(given - _USED_BY[self.method])
        if unused:
            raise ValueError(
                f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by "
                f"method={self.method!r} (it uses: {', '.join(sorted(_USED_BY[self.method]))}); remove it"
            )
        if self.tol is not None:
            check_float(self.tol, "tol", strict=True)
        if self.condition is not None:
            check_float(self.condition, "condition", minimum=1.0)
        for name in ("degree", "steps", "backward_steps"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)
        if self.normalization is not None:
            check_choice(self.normalization, "normalization", NORMALIZATIONS)
        if self.backward is not None:
            check_choice(self.backward, "backward", BACKWARDS)
        if self.precision is not None:
            check_choice(self.precision, "precision", PRECISIONS)
            if self.precision != "full" and self.method not in ("auto", "mtp"):
                raise ValueError(
                    f"precision={self.precision!r} plans mtp's mixed-precision iteration; method="
                    f"{self.method!r} runs at precision='full' only (pass method='mtp' or 'auto')"
                )
        if self.backward == "newton-schulz" and self.backward_steps is None:
            raise ValueError("backward='newton-schulz' needs backward_steps (it has no certified count)")
        if self.backward == "unrolled" and self.backward_steps is not None:
            raise ValueError(
                "backward_steps is not used by backward='unrolled' (it differentiates the forward)"
            )
        if self.backward == "unrolled" and self.steps == 1:
            raise ValueError(
                "backward='unrolled' needs an iteration (steps > 1): the single approximant of steps=1 is "
                "differentiated by the Lyapunov solver"
            )
        if self.tol is not None and self.steps is not None and self.backward_steps is not None:
            raise ValueError("tol is not used when both steps and backward_steps are fixed; remove one")
        for name in ("fused", "check_input"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be None, True or False, got {value!r}")

    @classmethod
    def coerce(cls, value: RootOptions | str | dict[str, Any] | None) -> RootOptions:
        """Options from a :class:`RootOptions`, a method name, a dict of fields (configs) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(
                    f"root options got unknown keys {unknown}; known: {[f.name for f in fields(cls)]}"
                )
            return cls(**value)
        raise TypeError(
            f"root must be a RootOptions, a method name, a dict or None, got {type(value).__name__}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults (for configs and ``repr``)."""
        return {k: v for k, v in asdict(self).items() if v != getattr(RootOptions, k)}

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"RootOptions({given})"

    def plan(self, n: int, *, eps: float, device: torch.device, dtype: torch.dtype) -> RootPlan:
        """Resolve for one call on matrices of size ``n`` with relative ridge ``eps``.

        Raises:
            ValueError: ``tol`` below what products in ``dtype`` can deliver (:data:`TOL_FLOOR`), or no
                schedule certifies it.
        """
        method = self.method
        if method == "auto":
            method = choose_method(device.type, self.tol or DEFAULT_TOL, dtype, is_tracing())
        unit_roundoff = torch.finfo(dtype).eps
        if method in ("mtp", "mpa") and self.tol is not None and self.tol < TOL_FLOOR * unit_roundoff:
            raise ValueError(
                f"tol={self.tol:g} is below what {dtype} products can deliver (the rounding of the products "
                f"alone is about {TOL_FLOOR} x {unit_roundoff:.2g} = {TOL_FLOOR * unit_roundoff:.2g}); pass "
                f"tol >= {TOL_FLOOR * unit_roundoff:.2g}"
                + (", or float64 input" if dtype != torch.float64 else "")
            )
        read_values = reads_values(self.check_input, device)
        precision = resolve_precision(self.precision, method, device, dtype, is_tracing())
        if precision == "tf32" and self.precision == "auto":
            precision = "full"
            try:  # auto's precision takes the mixed plan where it is certified and modelled faster
                mixed = _cached_plan(self, method, n, float(eps), unit_roundoff, read_values, "tf32")
                full = _cached_plan(self, method, n, float(eps), unit_roundoff, read_values, "full")
            except ValueError:
                pass
            else:
                low, high = mixed.mixed.products()
                mixed_time = modelled_time(low, high + MIXED_TEST_PRODUCTS, n)
                if mixed_time < full.products() + RESIDUAL_TEST_PRODUCTS:
                    return mixed
        if self.method == "auto" and method != "eigh" and not is_tracing():
            try:  # auto takes the certified iteration where it holds tol, else the exact path
                return _cached_plan(self, method, n, float(eps), unit_roundoff, read_values, precision)
            except ValueError:
                method = "eigh"
        return _cached_plan(self, method, n, float(eps), unit_roundoff, read_values, precision)


_PLANS: dict[tuple[RootOptions, str, int, float, float, bool, str], RootPlan | ValueError] = {}
"""The plans resolved so far, keyed on every argument of :func:`_plan`, and the refusals (a refused plan
is not searched for again)."""


@torch.compiler.assume_constant_result
def _cached_plan(
    options: RootOptions,
    method: str,
    n: int,
    eps: float,
    unit_roundoff: float,
    read_values: bool,
    precision: str,
) -> RootPlan:
    """:func:`_plan`, resolved once per distinct arguments (:data:`_PLANS`).

    Marked constant: while tracing, dynamo calls it on the host with the traced call's arguments, which
    it guards (options, size, ridge, dtype), and puts the plan in the graph as a constant. The cache is a
    plain dict rather than ``functools.cache``, whose wrapper dynamo would trace through with a warning.
    """
    key = (options, method, n, eps, unit_roundoff, read_values, precision)
    if key not in _PLANS:
        try:
            _PLANS[key] = _plan(*key)
        except ValueError as refusal:
            _PLANS[key] = refusal
    plan = _PLANS[key]
    if isinstance(plan, ValueError):
        raise ValueError(str(plan))
    return plan


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
    from fractions import Fraction

    x = np.geomspace(lower**2, 1.0, 4000)
    z = 1.0 - x
    exponent = Fraction(-1, 2)
    if series == "taylor":
        approx = sum(float(c) * z**k for k, c in enumerate(taylor_coefficients(exponent, degree)))
    else:
        p, q = pade_coefficients(exponent, degree, degree)
        approx = sum(float(c) * z**k for k, c in enumerate(p)) / sum(float(c) * z**k for k, c in enumerate(q))
    return float(np.abs(approx * np.sqrt(x) - 1.0).max())


def _plan(
    options: RootOptions,
    method: str,
    n: int,
    eps: float,
    unit_roundoff: float,
    read_values: bool,
    precision: str,
) -> RootPlan:
    """The plan of ``options`` for ``method`` (resolved from ``"auto"``) on matrices of size ``n`` with
    products at ``precision`` (resolved, :func:`covpool.linalg.precision.resolve_precision`)."""
    if method == "eigh":
        return RootPlan("eigh", None, None, None, None, None, 0.0, None, precision, read_values, "eigh")
    if method == "ns":
        normalization = options.normalization or "trace"
        lower = _lower_bound(normalization, max(n, 1), eps, None)
        forward = newton_schulz_schedule(lower, 1.0 + _FLOAT_SLACK, options.steps or 5)
        return RootPlan(
            "ns", normalization, forward, None, None, None, lower, None, precision, read_values, "autograd"
        )
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
        return _tf32_plan(options, method, n, unit_roundoff, read_values, normalization, lower, tol)
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
        gradient = "autograd" if method == "mpa" else "adjoint"
        return RootPlan(
            method,
            normalization,
            forward,
            None,
            None,
            None,
            lower,
            chosen_check(forward, None),
            precision,
            read_values,
            gradient,
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
    return RootPlan(
        method,
        normalization,
        forward,
        direct_degree,
        series,
        backward,
        lower,
        test,
        precision,
        read_values,
        "lyapunov",
        fused=bool(options.fused),
    )


MIXED_VALID_SHARE = 0.5
"""A ``"tf32"`` plan's modelled residual of a valid input (:func:`covpool.linalg.mixed.mixed_valid_residual`)
stays below this share of the test's limit (as :data:`_VALID_SHARE` for the float32 plans)."""


def _tf32_plan(
    options: RootOptions,
    method: str,
    n: int,
    unit_roundoff: float,
    read_values: bool,
    normalization: str,
    lower: float,
    tol: float,
) -> RootPlan:
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
            return RootPlan(
                method,
                normalization,
                plan.forward,
                None,
                None,
                plan.sign,
                lower,
                ResidualTest(tol, tol, valid),
                "tf32",
                read_values,
                "lyapunov",
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


PAPER_CONFIG = {
    "method": "mpa",
    "degree": 5,
    "steps": 1,
    "normalization": "frobenius",
    "backward": "newton-schulz",
    "backward_steps": 8,
}
"""Keyword arguments that reproduce Song, Sebe & Wang (ICLR 2022): one Padé [5/5] approximant after
Frobenius normalisation, 8 plain Newton-Schulz iterations in the backward: ``sqrtm(A, **PAPER_CONFIG)``."""
