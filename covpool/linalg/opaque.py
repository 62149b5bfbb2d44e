"""A root as one opaque operator of a compiled graph, so that its products keep the plan's precision.

A compiled graph cannot change torch's float32 matmul setting around its own products: inductor picks
its kernels from the setting at compile time. So when ``torch.compile`` or ``torch.export`` trace a root
while the setting is reduced (TF32 or bfloat16, :func:`covpool.linalg.precision.current_precision`), the
root enters the graph as the custom operator ``covpool::root`` instead of its products. At run time the
operator runs the eager root, whose products run inside :func:`covpool.linalg.precision.products_in`;
its backward is ``covpool::root_backward``, the exact gradient of the ridged root by a float64
eigendecomposition (a custom operator runs below autograd, so it cannot differentiate the eager root; no
second derivatives). The rest of the graph is compiled as usual. With the
setting at ``"highest"`` nothing changes: the root's products are traced into the graph.

Costs of the operator: no fusion across it, an eigendecomposition in the backward (a host sync on CUDA),
and a graph that ONNX cannot export (export with the setting at ``"highest"``).
"""

# No ``from __future__ import annotations``: torch 2.4's custom_op reads the annotations as types.
import json

import torch
from torch import Tensor

from covpool.linalg.eigh import exact_root_gradient
from covpool.linalg.options import OPTION_FIELDS, RootOptions
from covpool.linalg.planner import plan_call
from covpool.linalg.runner import run_root
from covpool.numerics import symmetrize, with_relative_ridge


def _eager_root(A: Tensor, inverse: bool, options: str, eps: float) -> Tensor:
    """The root planned and run eagerly, as :func:`covpool.sqrtm` runs it outside a traced graph."""
    resolved = RootOptions(**json.loads(options))
    return run_root(A, inverse, plan_call(resolved, A, eps), resolved, eps)


@torch.library.custom_op("covpool::root", mutates_args=())
def root_op(A: Tensor, inverse: bool, options: str, eps: float) -> Tensor:
    """``A^(±1/2)`` by the eager root. ``options``: the set fields of a :class:`RootOptions` as JSON
    (:func:`_as_json`; custom operators take strings, not objects). Shapes: ``(*, n, n)``."""
    return _eager_root(A, inverse, options, eps)


@root_op.register_fake
def _(A: Tensor, inverse: bool, options: str, eps: float) -> Tensor:
    return torch.empty_like(A)


@torch.library.custom_op("covpool::root_backward", mutates_args=())
def root_backward_op(A: Tensor, grad: Tensor, inverse: bool, options: str, eps: float) -> Tensor:
    """``∂L/∂A`` given ``grad = ∂L/∂A^(±1/2)``: the exact gradient of the ridged root, by a float64
    eigendecomposition (:func:`covpool.linalg.eigh.exact_root_gradient`), within ``tol`` of the root's
    own. A custom operator runs below autograd, so the eager root cannot be differentiated here.
    Shapes: ``(*, n, n)``."""
    ridged = with_relative_ridge(symmetrize(A.double()), eps)
    grad_ridged = exact_root_gradient(ridged, grad.double(), inverse=inverse)
    return with_relative_ridge(grad_ridged, eps).to(A.dtype)  # the ridge is self-adjoint


@root_backward_op.register_fake
def _(A: Tensor, grad: Tensor, inverse: bool, options: str, eps: float) -> Tensor:
    return torch.empty_like(A)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    A, inverse, options, eps = inputs
    ctx.save_for_backward(A)
    ctx.arguments = (inverse, options, eps)


def _backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
    (A,) = ctx.saved_tensors
    return root_backward_op(A, grad.contiguous(), *ctx.arguments), None, None, None


root_op.register_autograd(_backward, setup_context=_setup_context)


def _as_json(options: RootOptions) -> str:
    """The fields of ``options`` that are set, as the operator's JSON string; built from plain string
    operations, which dynamo traces (it cannot trace ``json``, and options built inside the compiled
    region are not constants)."""
    items = []
    for name in OPTION_FIELDS:
        value = getattr(options, name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value + '"'
        else:
            text = str(value)
        items.append('"' + name + '": ' + text)
    return "{" + ", ".join(items) + "}"


def opaque_root(A: Tensor, inverse: bool, options: RootOptions, eps: float) -> Tensor:
    """The root of ``A`` (``(*, n, n)``) as one ``covpool::root`` operator of the traced graph."""
    return root_op(A, inverse, _as_json(options), eps)
