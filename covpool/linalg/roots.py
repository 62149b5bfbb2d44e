"""The public matrix roots :func:`sqrtm` and :func:`inv_sqrtm`.

A call validates its arguments (:mod:`covpool.checks`), asks the planner what runs
(:func:`covpool.linalg.planner.plan_call`) and runs it: as the ``covpool::root`` operator of a traced graph
(:mod:`covpool.linalg.opaque`) or eagerly (:func:`covpool.linalg.runner.run_root`).
"""

from __future__ import annotations

from typing import Any

import torch

from covpool.checks import check_float, check_square_batch
from covpool.linalg.opaque import opaque_root
from covpool.linalg.options import OPTION_FIELDS, RootOptions
from covpool.linalg.planner import plan_call
from covpool.linalg.runner import run_root


def _root(
    A: torch.Tensor,
    inverse: bool,
    options: RootOptions | str | dict[str, Any] | None,
    eps: float,
    fields: dict[str, Any],
) -> torch.Tensor:
    if options is not None and fields:
        raise ValueError(
            f"pass either options= or keyword options, not both (got options and {sorted(fields)})"
        )
    unknown = sorted(set(fields) - set(OPTION_FIELDS))
    if unknown:
        raise TypeError(
            f"{'inv_sqrtm' if inverse else 'sqrtm'}() got unknown keyword arguments {unknown}; the keywords "
            f"are eps and the fields of RootOptions: {', '.join(OPTION_FIELDS)}"
        )
    resolved = RootOptions(**fields) if options is None else RootOptions.coerce(options)
    check_float(eps, "eps")
    check_square_batch(A)
    plan = plan_call(resolved, A, eps)
    if plan.method == "opaque":
        return opaque_root(A, inverse, resolved, eps)
    return run_root(A, inverse, plan, resolved, eps)


_DOC = """{summary}

    Args:
        A: ``(*, n, n)`` symmetric positive {definite} matrices, any number of leading batch dimensions
            (none, or empty batches, too). Only the symmetric part ``(A + Aᵀ) / 2`` is used.
            float16/bfloat16 are computed in float32 and returned in their own dtype; autocast is disabled
            inside.
        options: a :class:`covpool.RootOptions` (or a method name, or a dict of its fields); or give its
            fields as keywords instead (``method="mtp", tol=1e-4``), not both.
        **fields: the fields of :class:`covpool.RootOptions`, as keywords.
        eps: relative ridge: the root of ``A + eps · (tr(A) / n) · I`` is returned, with the exact gradient
            of that regularised function. For rank-deficient covariances (e.g. 1e-4, the covariance heads'
            default); it also bounds ``κ`` by ``(n + eps) / eps``, which sizes the mtp/mpa schedules.
            Default 0.

    Returns:
        ``(*, n, n)`` tensor of ``A``'s dtype. A matrix that is not valid input (NaN/Inf, not positive
        {definite}, or, for mtp/mpa, a spectrum beyond the bound the schedule was certified for) gets NaN;
        with ``check_input`` (default on CPU) a ``ValueError`` names it instead.

    The paper's configuration is ``{name}(A, **covpool.PAPER_CONFIG)``.

    Example:
        >>> import torch, covpool
        >>> A = covpool.testing.random_spd(4, n=8, dtype=torch.float32)
        >>> {name}(A, method="mtp", tol=1e-4).shape
        torch.Size([4, 8, 8])
    """


def sqrtm(
    A: torch.Tensor,
    options: RootOptions | str | dict[str, Any] | None = None,
    *,
    eps: float = 0.0,
    **fields: Any,
) -> torch.Tensor:
    return _root(A, False, options, eps, fields)


def inv_sqrtm(
    A: torch.Tensor,
    options: RootOptions | str | dict[str, Any] | None = None,
    *,
    eps: float = 0.0,
    **fields: Any,
) -> torch.Tensor:
    return _root(A, True, options, eps, fields)


sqrtm.__doc__ = _DOC.format(
    summary="Principal square root ``A^(1/2)`` of symmetric positive semi-definite matrices.",
    definite="semi-definite",
    name="sqrtm",
)
inv_sqrtm.__doc__ = _DOC.format(
    summary="Inverse principal square root ``A^(-1/2)`` of symmetric positive definite matrices.",
    definite="definite",
    name="inv_sqrtm",
)
