"""The precision of the roots' matrix products: a decision of the plan, scoped to the root.

Two precisions are planned (``RootOptions(precision=...)``): ``"full"`` (the default), every product in
the working dtype; ``"tf32"``, mtp's mixed plan (:mod:`covpool.linalg.mixed`), its bulk in TF32 products
and float32 refinements that meet ``tol``. ``"auto"`` resolves to ``"tf32"`` where that plan is certified
and modelled faster, else ``"full"`` (:mod:`covpool.linalg.planner` decides). This module scopes the
products to the plan's precision.

A plan's schedules and its residual test are certified for products computed in the working dtype
(:func:`covpool.numerics.working_dtype`). torch lets a user lower the precision of every float32
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
  A capture records the kernels chosen under the scope, so replays keep the plan's precision. A
  ``"tf32"`` plan's low phases run inside :func:`tf32_products`, nested in that scope.
- **threads**: torch's setting is process-wide. Scopes are counted under a lock, so nested and concurrent
  roots restore the user's setting only when the last one exits; while any root runs, another thread's
  float32 products run at full precision too (never less precise than asked), except during the low
  phases of a ``"tf32"`` plan on CUDA, which set TF32 only while no other root's scope is open (another
  root entering one revokes it) and then run other threads' float32 CUDA products in TF32 too.
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

import torch

from covpool.linalg.emulation import emulated_products
from covpool.numerics import is_tracing

_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")
"""torch >= 2.9 keeps the setting per backend (``fp32_precision``: CUDA, oneDNN); reading the legacy
flags after a mix of both APIs raises there, so only the new one is used where it exists. Before, the
setting is one string, which ``allow_tf32`` reads and writes as ``!= "highest"``."""
_FULL = ("ieee", "ieee") if _NEW_API else ("highest", "")
_TF32 = ("tf32", "ieee") if _NEW_API else ("high", "")

_lock = threading.Lock()
_depth = 0
_saved: tuple[str, str] | None = None
"""torch's setting when the outermost scope was entered."""
_tf32_owner: int | None = None
"""The thread whose TF32 phase (:func:`tf32_products`) set TF32, while it lasts."""


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


def reduced(dtype: torch.dtype) -> bool:
    """Whether torch's setting would run ``dtype`` products below full precision: float32 products under
    TF32/bfloat16 (float64 products have no reduced mode in torch)."""
    return dtype == torch.float32 and _traced_precision() != "highest"


def _enter() -> None:
    global _depth, _saved, _tf32_owner
    with _lock:
        if _depth == 0:
            _saved = _read()
            _write(_FULL)
        elif _tf32_owner is not None:  # another root's TF32 phase: back to full precision for this one
            _write(_FULL)
            _tf32_owner = None
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

    Nothing is changed where the setting is not reduced (:func:`reduced`), except for a ``"tf32"`` plan,
    whose scope is always entered: its low phases (:func:`tf32_products`) set TF32 inside it and its
    float32 phases need the full precision it restores.

    Raises:
        RuntimeError: while ``torch.compile``/``torch.export`` trace with the global setting reduced.
    """
    if not (reduced(dtype) or precision == "tf32"):
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


@contextlib.contextmanager
def tf32_products(device: torch.device) -> Iterator[None]:
    """The low phases of a ``"tf32"`` plan, inside its :func:`products_in` scope: on CUDA, float32
    products in TF32 (restored on exit, exceptions included), set only while no other root's scope is
    open; elsewhere TF32 products emulated by rounding their operands
    (:func:`covpool.linalg.emulation.emulated_products`): the same numerics, slower than full precision,
    for checking a plan without a GPU."""
    global _tf32_owner
    if device.type != "cuda":
        with emulated_products("tf32"):
            yield
        return
    me = threading.get_ident()
    with _lock:
        owned = _depth == 1 and _tf32_owner is None
        if owned:
            _write(_TF32)
            _tf32_owner = me
    try:
        yield
    finally:
        with _lock:
            if owned and _tf32_owner == me:
                _write(_FULL)
                _tf32_owner = None


@contextlib.contextmanager
def traced_at_full_precision() -> Iterator[None]:
    """torch's float32 matmul setting at ``"highest"`` as if the user had set it, for the duration
    (restored on exit, exceptions included): a root traced inside traces its products (the setting it
    reads is the user's, :func:`global_precision`) instead of becoming the opaque operator
    (:mod:`covpool.linalg.opaque`). :func:`covpool.export_onnx` exports inside it: ONNX Runtime runs float32
    products in float32, and ONNX has no operator for ``covpool::root``."""
    global _saved
    with _lock:
        saved = _saved if _depth else _read()
        if _depth:
            _saved = _FULL
        else:
            _write(_FULL)
    try:
        yield
    finally:
        with _lock:
            if _depth:
                _saved = saved
            else:
                _write(saved)


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


def scoped_backward(x: torch.Tensor, *, enter: bool) -> torch.Tensor:
    """``x``, marked so that its backward enters or leaves the full-precision scope (see
    :class:`ScopeBoundary`); ``x`` itself where nothing needs scoping or no graph is recorded."""
    if not (torch.is_grad_enabled() and x.requires_grad) or is_tracing() or not reduced(x.dtype):
        return x
    return ScopeBoundary.apply(x, enter)
