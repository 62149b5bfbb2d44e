"""Resolved settings of one matrix-root call, with the defaults of each method in one place."""

from __future__ import annotations

from dataclasses import dataclass

from covpool.linalg.checks import check_choice, check_positive_int
from covpool.linalg.normalization import NORMALIZATIONS

METHODS = ("auto", "mpa", "mtp", "ns", "eigh")

# Defaults per method: (degree, steps, normalization). Measured on SPD matrices with condition numbers up
# to 1e3 in float32 (``python -m covpool.bench``): every default reaches a relative error below 1e-5
# there except "ns", which keeps iSQRT-COV's five iterations and trace normalisation for comparability.
_METHOD_DEFAULTS = {
    "mpa": (2, 4, "power"),
    "mtp": (8, 4, "power"),
    "ns": (1, 5, "trace"),
    "eigh": (0, 0, "power"),
}


@dataclass(frozen=True)
class RootOptions:
    """Everything that decides how a root is computed; see :func:`covpool.sqrtm` for the meaning."""

    method: str
    degree: int
    steps: int
    normalization: str
    backward_iters: int = 20
    backward_tol: float | None = 1e-5
    backward_newton: bool = True

    @property
    def series(self) -> str:
        """The series behind the method: ``"pade"`` for mpa, ``"taylor"`` for mtp and ns."""
        return "pade" if self.method == "mpa" else "taylor"


def resolve_options(
    method: str,
    *,
    degree: int | None,
    steps: int | None,
    normalization: str | None,
    backward_iters: int,
    backward_tol: float | None,
    backward_newton: bool,
) -> RootOptions:
    """Fill the per-method defaults and validate every argument (``method`` must not be ``"auto"``)."""
    check_choice(method, "method", METHODS[1:])
    default_degree, default_steps, default_normalization = _METHOD_DEFAULTS[method]
    options = RootOptions(
        method=method,
        degree=default_degree if degree is None else degree,
        steps=default_steps if steps is None else steps,
        normalization=default_normalization if normalization is None else normalization,
        backward_iters=backward_iters,
        backward_tol=backward_tol,
        backward_newton=backward_newton,
    )
    if method in ("mpa", "mtp", "ns"):
        check_positive_int(options.degree, "degree")
        check_positive_int(options.steps, "steps")
    check_choice(options.normalization, "normalization", NORMALIZATIONS)
    check_positive_int(backward_iters, "backward_iters", minimum=0)
    if backward_tol is not None and not backward_tol > 0.0:
        raise ValueError(f"backward_tol must be None or a float > 0, got {backward_tol!r}")
    return options


PAPER_CONFIG = {
    "method": "mpa",
    "degree": 5,
    "steps": 1,
    "normalization": "frobenius",
    "backward_iters": 8,
    "backward_tol": None,
    "backward_newton": False,
}
"""Keyword arguments that reproduce Song, Sebe & Wang (ICLR 2022): one Padé [5/5] approximant after
Frobenius normalisation, 8 plain Newton-Schulz iterations in the backward: ``sqrtm(A, **PAPER_CONFIG)``."""
