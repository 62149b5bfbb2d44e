"""The precision of the roots' matrix products: a decision of the plan, scoped to the root.

A plan's schedules and its residual test are certified for products computed in the working dtype
(:func:`covpool.linalg.numerics.working_dtype`). torch lets a user lower the precision of every float32
product globally: ``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA, as Lightning advises on
every tensor-core GPU), ``"medium"`` (bfloat16 products where the backend has them, oneDNN on CPUs with
AMX included), ``torch.backends.cuda.matmul.allow_tf32``. TF32's unit roundoff, 4.9e-4, is four thousand
times float32's and cannot hold a schedule certified for ``tol = 1e-3`` at condition 1e3 (measured: the
default root 1.4e-3 / 1.8e-3 off, a covariance head NaN). So the roots run their products inside
:func:`products_in`, which sets the precision the plan was certified for and restores the user's setting
on exit, exceptions included:

- **eager and CUDA-graph capture**: the setting is changed for the duration of the root's forward and of
  its backward (the custom backward of mtp/mpa runs inside the scope; the autograd-differentiated
  methods, ns and unrolled mpa, mark their backward's first and last node, see :class:`ScopeBoundary`).
  A capture records the kernels chosen under the scope, so replays keep the plan's precision.
- **threads**: torch's setting is process-wide. Scopes are counted under a lock, so nested and concurrent
  roots restore the user's setting only when the last one exits; while any root runs, another thread's
  float32 products run at full precision too (never less precise than asked).
- **torch.compile / torch.export**: a compiled graph cannot change the setting around its own products
  (inductor chooses its kernels from the setting at compile time), so a root traced while the global
  setting is reduced enters the graph as one opaque operator that runs the eager root at run time
  (:mod:`covpool.linalg.opaque`; dynamo guards on the setting, so changing it recompiles). Tracing the
  products themselves under a reduced setting raises (:func:`products_in`), which nothing in covpool does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

import torch

from covpool.linalg.numerics import is_tracing

Precision = Literal["full"]
PRECISIONS: tuple[str, ...] = ("full",)
"""``"full"``: products in the working dtype's own precision (IEEE float32 or float64), whatever torch's
global matmul setting."""

_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")
"""torch >= 2.9 keeps the setting per backend (``fp32_precision``: CUDA, oneDNN); reading the legacy
flags after a mix of both APIs raises there, so only the new one is used where it exists. Before, the
setting is one string, which ``allow_tf32`` reads and writes as ``!= "highest"``."""
_FULL = ("ieee", "ieee") if _NEW_API else ("highest", "")

_lock = threading.Lock()
_depth = 0
_saved: tuple[str, str] | None = None
"""torch's setting when the outermost scope was entered."""


def _read() -> tuple[str, str]:
    if _NEW_API:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision
    return torch.get_float32_matmul_precision(), ""


def _write(state: tuple[str, str]) -> None:
    if _NEW_API:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = state
    else:
        torch.set_float32_matmul_precision(state[0])


def _describe(state: tuple[str, str]) -> str:
    if _NEW_API:
        inherited = torch.backends.fp32_precision
        cuda, cpu = (inherited if value == "none" else value for value in state)
        reduced = [
            f"{name}={value}"
            for name, value in (("cuda", cuda), ("mkldnn", cpu))
            if value not in ("none", "ieee")
        ]
        return ", ".join(reduced) or "highest"
    return state[0]


def current_precision() -> str:
    """torch's float32 matmul setting now: ``"highest"`` (IEEE float32) or what is reduced (TF32 or
    bfloat16, by backend)."""
    return _describe(_read())


def global_precision() -> str:
    """The user's float32 matmul setting (:func:`current_precision`) as it was before any root's scope
    changed it."""
    with _lock:
        state = _saved or _read()
    return _describe(state)


@torch.compiler.assume_constant_result
def _traced_precision() -> str:
    """:func:`global_precision`, evaluated on the host while tracing (dynamo guards on the setting)."""
    return global_precision()


def reduced(precision: str, dtype: torch.dtype) -> bool:
    """Whether torch's setting would run ``dtype`` products below ``precision``: float32 products under
    TF32/bfloat16 (float64 products have no reduced mode in torch)."""
    return precision == "full" and dtype == torch.float32 and _traced_precision() != "highest"


def _enter() -> None:
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _read()
            _write(_FULL)
        _depth += 1


def _exit() -> None:
    global _depth, _saved
    with _lock:
        _depth -= 1
        if _depth == 0 and _saved is not None:
            _write(_saved)
            _saved = None


@contextlib.contextmanager
def products_in(precision: str, dtype: torch.dtype) -> Iterator[None]:
    """Run the enclosed products at ``precision`` for a root working in ``dtype``; restore on exit.

    Nothing is changed where the setting is not reduced (:func:`reduced`).

    Raises:
        RuntimeError: while ``torch.compile``/``torch.export`` trace with the global setting reduced.
    """
    if not reduced(precision, dtype):
        yield
        return
    if is_tracing():
        raise RuntimeError(
            f"covpool's roots are certified for full float32 products, but torch's float32 matmul "
            f"precision is {_traced_precision()!r} (TF32/bfloat16) while torch.compile traces, and a "
            "compiled graph cannot change it around its own products: call "
            "torch.set_float32_matmul_precision('highest') before compiling, or run the root outside "
            "the compiled region"
        )
    _enter()
    try:
        yield
    finally:
        _exit()


class ScopeBoundary(torch.autograd.Function):
    """Identity whose backward enters (``enter=True``) or leaves the full-precision scope.

    The autograd-differentiated roots put one with ``enter=True`` on their output and one with
    ``enter=False`` on their input, so that every node of their backward in between runs at the plan's
    precision. Limit: if that backward raises in between (an out-of-memory error), the scope stays
    entered and float32 products keep full precision until the process ends.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, enter: bool) -> torch.Tensor:  # noqa: D102
        ctx.enter = enter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (_enter if ctx.enter else _exit)()
        return grad, None


def scoped_backward(x: torch.Tensor, precision: str, *, enter: bool) -> torch.Tensor:
    """``x``, marked so that its backward enters or leaves the scope of ``precision`` (see
    :class:`ScopeBoundary`); ``x`` itself where nothing needs scoping or no graph is recorded."""
    if not (torch.is_grad_enabled() and x.requires_grad) or is_tracing() or not reduced(precision, x.dtype):
        return x
    return ScopeBoundary.apply(x, enter)
