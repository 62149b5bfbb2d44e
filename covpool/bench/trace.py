"""Trace the CUDA code path on any machine: count host synchronisations, matrix products and kernels.

Inputs are fake CUDA tensors (:class:`torch._subclasses.fake_tensor.FakeTensorMode`), so nothing runs and
no GPU is needed; reading a tensor value on the host (``.item()``, ``bool(t)``, ``nonzero`` …) raises
``DataDependentOutputException``, which :func:`trace_root` counts as a synchronisation. The autograd engine
needs a real CUDA context, so the backward graph is walked node by node (``node(*grads)``, or
``node.apply(*grads)`` for custom Functions). Every dispatched op is counted by a ``TorchDispatchMode``;
views and metadata queries launch no kernel and are left out.

``python -m covpool.bench --trace`` prints the counts; a test asserts them.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

FAKE_CUDA_SUPPORTED = torch.torch_version.TorchVersion(torch.__version__) >= "2.11"
"""Fake CUDA tensors abort the process before torch 2.11 (seen with 2.4)."""

PRODUCT_OPS = frozenset({"aten.bmm", "aten.baddbmm", "aten.mm", "aten.addmm"})
NO_KERNEL_OPS = frozenset(
    {
        "aten.view",
        "aten._unsafe_view",
        "aten.expand",
        "aten.transpose",
        "aten.t",
        "aten.permute",
        "aten.slice",
        "aten.select",
        "aten.diagonal",
        "aten.unsqueeze",
        "aten.squeeze",
        "aten.alias",
        "aten.as_strided",
        "aten.detach",
        "aten.split",
        "aten.unbind",
        "aten.lift_fresh",
        "aten._reshape_alias",
        "aten.sym_size",
        "aten.sym_stride",
        "aten.sym_numel",
        "aten.sym_storage_offset",
        "aten.is_same_size",
        "prim.device",
        "prim.layout",
        "aten.promote_types",
        "aten.result_type",
    }
)


@dataclass
class OpCount:
    """Ops seen while tracing one computation.

    Attributes:
        products: calls of ``bmm``/``baddbmm``/``mm``/``addmm``.
        product_units: their work in units of one ``n × n`` by ``n × n`` product per matrix.
        other_kernels: every other op that launches a kernel.
        ops: count per op name, views and metadata included.
    """

    products: int = 0
    product_units: float = 0.0
    other_kernels: int = 0
    ops: collections.Counter = field(default_factory=collections.Counter)

    @property
    def kernels(self) -> int:
        return self.products + self.other_kernels

    @property
    def kernels_per_product(self) -> float:
        return self.kernels / max(self.product_units, 1e-12)


class _Counter(TorchDispatchMode):
    def __init__(self, n: int, batch: int) -> None:
        super().__init__()
        self.count = OpCount()
        self.unit = n**3 * batch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.count.ops[name] += 1
        out = func(*args, **(kwargs or {}))
        if name in PRODUCT_OPS:
            self.count.products += 1
            a, b = (args[1], args[2]) if name in ("aten.baddbmm", "aten.addmm") else (args[0], args[1])
            batch = a.shape[0] if a.ndim == 3 else 1
            self.count.product_units += batch * a.shape[-2] * a.shape[-1] * b.shape[-1] / self.unit
        elif name not in NO_KERNEL_OPS and _on_cuda(out):
            self.count.other_kernels += 1
        return out


def _on_cuda(out) -> bool:
    """Whether an op's result lives on the GPU (a Python scalar wrapped on the CPU launches nothing)."""
    first = out[0] if isinstance(out, tuple | list) and out else out
    return not isinstance(first, torch.Tensor) or first.device.type == "cuda"


def _walk_backward(output: torch.Tensor, grad: torch.Tensor, counter: _Counter) -> None:
    """Run the backward graph of ``output`` node by node (no autograd engine, hence no CUDA context).

    Only the nodes' own ops are counted (``counter`` is entered around each call), not the zero gradients
    made up here for outputs that received none.
    """
    order: list = []
    seen: set = set()

    def visit(node) -> None:
        stack = [(node, False)]
        while stack:
            current, done = stack.pop()
            if current is None:
                continue
            if done:
                order.append(current)
                continue
            if current in seen:
                continue
            seen.add(current)
            stack.append((current, True))
            stack.extend((child, False) for child, _ in current.next_functions)

    visit(output.grad_fn)
    pending: dict = collections.defaultdict(dict)
    pending[output.grad_fn][0] = grad
    for node in reversed(order):
        grads = pending.pop(node, {})
        if type(node).__name__ == "AccumulateGrad":
            continue
        inputs = [
            grads.get(i, torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device))
            for i, meta in enumerate(node._input_metadata)
        ]
        with counter:
            results = node.apply(*inputs) if hasattr(node, "_forward_cls") else node(*inputs)
        results = results if isinstance(results, tuple) else (results,)
        for (child, slot), value in zip(node.next_functions, results, strict=False):
            if child is None or value is None:
                continue
            shape = tuple(child._input_metadata[slot].shape)
            if tuple(value.shape) != shape:  # the engine reduces broadcast gradients; so must this walk
                with counter:
                    value = value.sum_to_size(shape)
            previous = pending[child].get(slot)
            if previous is not None:  # the engine accumulates in a kernel too
                with counter:
                    value = previous + value
            pending[child][slot] = value


@dataclass
class TraceResult:
    """Counts of one traced call: forward, backward, and host synchronisations hit."""

    forward: OpCount
    backward: OpCount
    syncs: int

    @property
    def products(self) -> float:
        return self.forward.product_units + self.backward.product_units

    @property
    def kernels_per_product(self) -> float:
        return (self.forward.kernels + self.backward.kernels) / max(self.products, 1e-12)


def trace_root(function: Callable[[torch.Tensor], torch.Tensor], *, n: int, batch: int) -> TraceResult:
    """Trace ``function`` on a fake CUDA batch of SPD-shaped ``(batch, n, n)`` input, forward and backward.

    A host synchronisation stops the trace of that pass (the exception is the proof); ``syncs`` counts the
    passes that hit one.

    Example:
        >>> import covpool
        >>> result = trace_root(covpool.sqrtm, n=16, batch=4)  # doctest: +SKIP
        >>> result.syncs  # doctest: +SKIP
        0
    """
    if not FAKE_CUDA_SUPPORTED:
        raise RuntimeError(f"tracing needs torch >= 2.11 (fake CUDA tensors abort torch {torch.__version__})")
    syncs = 0
    with FakeTensorMode(allow_non_fake_inputs=True):
        A = torch.empty(batch, n, n, device="cuda").requires_grad_(True)
        forward = _Counter(n, batch)
        try:
            with forward:
                out = function(A)
        except DataDependentOutputException:
            return TraceResult(forward.count, OpCount(), 1)
        backward = _Counter(n, batch)
        try:
            with torch.no_grad():
                _walk_backward(out, torch.empty_like(out), backward)
        except DataDependentOutputException:
            syncs += 1
    return TraceResult(forward.count, backward.count, syncs)
