"""Options of the matrix roots: one object with the fields, their defaults and their validation.

:class:`RootOptions` is what every layer, model and config passes, unchanged, down to
:func:`covpool.sqrtm` / :func:`covpool.inv_sqrtm`. It is validated when it is built (on the host, the same on
every device): a value out of range, or an option the chosen method does not use, raises at once. Each
field is declared once, with the methods that use it; everything else (the keywords the roots accept, the
operator's JSON, the error for an unused option) is derived from that declaration. What a call runs is
decided by :func:`covpool.linalg.planner.plan_root`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from covpool.checks import check_choice, check_float, check_positive_int

Method = Literal["auto", "mtp", "mpa", "ns", "eigh"]
Normalization = Literal["schatten8", "frobenius", "trace"]
Backward = Literal["minimax", "newton-schulz", "unrolled"]
Precision = Literal["full", "tf32", "auto"]
METHODS: tuple[str, ...] = ("auto", "mtp", "mpa", "ns", "eigh")
NORMALIZATIONS: tuple[str, ...] = ("schatten8", "frobenius", "trace")
BACKWARDS: tuple[str, ...] = ("minimax", "newton-schulz", "unrolled")
PRECISIONS: tuple[str, ...] = ("full", "tf32", "auto")
"""``"full"``: products in the working dtype's own precision (IEEE float32 or float64), whatever torch's
global matmul setting; ``"tf32"``: mtp's mixed plan; ``"auto"``: see :mod:`covpool.linalg.planner`."""

DEFAULT_TOL = 1e-3
DEFAULT_CONDITION = 1e3


def _used_by(*methods: str) -> Any:
    """A field that is None by default and used by ``methods`` (any other method refuses it)."""
    return field(default=None, metadata={"methods": methods})


_SERIES = ("auto", "mtp", "mpa")
_ITERATIONS = ("mtp", "mpa")


@dataclass(frozen=True)
class RootOptions:
    """Options of :func:`covpool.sqrtm` and :func:`covpool.inv_sqrtm`; every field is optional.

    Args:
        method: ``"auto"`` (default: ``"eigh"`` on CPU, where it is measured fastest; ``"mtp"`` on CUDA and
            while tracing), ``"mtp"`` (coupled minimax-polynomial iteration, matrix products only, Lyapunov
            backward), ``"mpa"`` (coupled scaled Padé iteration with Cholesky solves, Lyapunov backward),
            ``"ns"`` (iSQRT-COV's Newton-Schulz iteration, autograd through the steps), ``"eigh"``
            (eigendecomposition, exact Daleckii-Krein backward).
        tol: relative error of forward and gradient, in (0, 1), that mtp/mpa schedules are certified for
            (default 1e-3; for the gradient, to first order in the forward's error); with ``"auto"`` on CPU,
            also what decides which matrices eigh decomposes in float32 (:mod:`covpool.linalg.eigh`).
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
            :func:`covpool.linalg.planner.modelled_time`), else
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
    tol: float | None = _used_by(*_SERIES)
    condition: float | None = _used_by(*_SERIES)
    degree: int | None = _used_by(*_ITERATIONS)
    steps: int | None = _used_by(*_ITERATIONS, "ns")
    normalization: Normalization | None = _used_by(*_ITERATIONS, "ns")
    backward: Backward | None = _used_by(*_ITERATIONS)
    backward_steps: int | None = _used_by(*_ITERATIONS)
    precision: Precision | None = _used_by(*METHODS)
    fused: bool | None = _used_by(*_SERIES)
    check_input: bool | None = _used_by(*METHODS)

    def __post_init__(self) -> None:
        check_choice(self.method, "method", METHODS)
        given = {f.name for f in fields(self) if f.name != "method" and getattr(self, f.name) is not None}
        unused = sorted(given - USED_BY[self.method])
        if unused:
            raise ValueError(
                f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by "
                f"method={self.method!r} (it uses: {', '.join(sorted(USED_BY[self.method]))}); remove it"
            )
        if self.tol is not None:
            check_float(self.tol, "tol", strict=True)
            if self.tol >= 1.0:
                raise ValueError(f"tol is a relative error and must be below 1, got {self.tol!r}")
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
            unknown = sorted(set(value) - set(OPTION_FIELDS))
            if unknown:
                raise ValueError(f"root options got unknown keys {unknown}; known: {list(OPTION_FIELDS)}")
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


OPTION_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RootOptions))
"""The fields of :class:`RootOptions`, in declaration order: the keywords :func:`covpool.sqrtm` accepts."""
USED_BY: dict[str, frozenset[str]] = {
    method: frozenset(f.name for f in fields(RootOptions) if method in f.metadata.get("methods", ()))
    for method in METHODS
}
"""The fields each method uses, from the fields' declarations."""


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
