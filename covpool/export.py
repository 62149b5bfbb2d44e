"""Export of covariance-pooled models to ONNX: :func:`export_onnx`.

It is ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, which needs ``onnx`` and
``onnxscript``) with a dynamic batch dimension, plus what our layers need before it:

- **Root methods ONNX can express.** ``"mtp"`` and ``"ns"`` are matrix products and additions only and
  export; ``"auto"`` does too, since it resolves to a matmul method while tracing. ``"eigh"`` needs an
  eigendecomposition and ``"mpa"`` a Cholesky solve, neither of which is an ONNX operator: a model with such
  a layer is refused at once with the layer's name and what to change, instead of an exporter error deep in
  the conversion. The ZCA layers compute their evaluation whitening matrix in the graph when traced, so the
  rule holds for them too.
- **Inference graphs only.** A model in training mode is refused: its ZCA layers would use batch
  statistics and update their running ones, and dropout would be live.
- **Full-precision products, whatever torch's setting.** A root that ``torch.export`` traces while the
  float32 matmul setting is TF32/bfloat16 becomes an opaque operator ONNX cannot express
  (:mod:`covpool.linalg.opaque`), so the export runs with the setting at ``"highest"``
  (:func:`covpool.linalg.precision.traced_at_full_precision`; the user's is restored after). ONNX Runtime
  runs float32 products in float32.

The legacy TorchScript exporter (``dynamo=False``) is not used: it has no symbolic for ``aten::mT``, which
the matrix roots use throughout.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from covpool.layers.head_base import CovarianceHead
from covpool.layers.zca_batchnorm import _ZCABatchNorm
from covpool.linalg.precision import traced_at_full_precision

ONNX_METHODS = ("auto", "mtp", "ns")
"""Root methods whose layers export to ONNX."""
_WHY_NOT = {
    "eigh": "ONNX has no eigendecomposition operator",
    "mpa": "ONNX has no Cholesky operator (the Padé step solves with one)",
}
DEFAULT_OPSET = 18
"""ONNX opset of :func:`export_onnx` by default: the lowest the ``torch.export``-based exporter targets."""


def _layer_method(layer: nn.Module) -> str:
    """Root method of a covpool layer."""
    return layer.root.method


def onnx_blockers(model: nn.Module) -> list[str]:
    """One line per covpool layer of ``model`` whose root method ONNX cannot express (empty: none).

    Example:
        >>> import covpool
        >>> onnx_blockers(covpool.CovPoolHead(8, 2, reduction_dim=4, root="mtp"))
        []
        >>> onnx_blockers(nn.Sequential(covpool.ZCABatchNorm1d(4, group_size=2, root="eigh")))
        ["layer '0' (ZCABatchNorm1d) has method='eigh': ONNX has no eigendecomposition operator"]
    """
    lines = []
    for name, module in model.named_modules():
        if isinstance(module, (CovarianceHead, _ZCABatchNorm)):
            method = _layer_method(module)
            if method not in ONNX_METHODS:
                label = name or "<root>"
                lines.append(
                    f"layer '{label}' ({type(module).__name__}) has method={method!r}: {_WHY_NOT[method]}"
                )
    return lines


def _as_tuple(example: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    examples = (example,) if isinstance(example, Tensor) else tuple(example)
    if not examples or not all(isinstance(t, Tensor) for t in examples):
        raise TypeError(
            f"example must be a tensor or a non-empty tuple of tensors, got {type(example).__name__}"
        )
    return examples


def export_onnx(
    model: nn.Module,
    example: Tensor | tuple[Tensor, ...],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> Path:
    """Export ``model`` (in eval mode) to an ONNX file at ``path``; returns the path.

    Args:
        model: the network, in eval mode, whose covpool layers use a root method of :data:`ONNX_METHODS`.
        example: example input(s); only their shapes and dtypes matter.
        path: output ``.onnx`` file (folders are created).
        dynamic_batch: make dimension 0 of every input a free ``batch`` dimension; the example's batch must
            then be at least 2 (``torch.export`` specialises a dimension of size 1 to the constant 1).
        opset: ONNX opset version.
        input_names: names of the graph inputs (default: the names of ``forward``'s arguments).
        output_names: names of the graph outputs.

    Raises:
        ValueError: the model is in training mode, a covpool layer's method cannot be exported (the message
            names every such layer and what to change), or the example batch is 1 with ``dynamic_batch``.
        ModuleNotFoundError: ``onnx`` or ``onnxscript`` is missing (``pip install "covpool[export]"``).

    Shape:
        - example: :math:`(B, *)` per input, :math:`B \\ge 2` with ``dynamic_batch``
        - ONNX inputs: :math:`(\\text{batch}, *)` with ``dynamic_batch``, else the example's shapes

    Example::

        model = timm.create_model("resnet18_isqrtcov", num_classes=10).eval()
        covpool.export_onnx(model, torch.randn(2, 3, 224, 224), "model.onnx")
        session = onnxruntime.InferenceSession("model.onnx")
        logits = session.run(None, {"x": images.numpy()})[0]
    """
    if model.training:
        raise ValueError(
            f"export_onnx exports inference graphs: call model.eval() first (got {type(model).__name__} in "
            f"training mode, where ZCA layers use batch statistics and dropout is active)"
        )
    blockers = onnx_blockers(model)
    if blockers:
        raise ValueError(
            f"{type(model).__name__} cannot be exported to ONNX:\n  "
            + "\n  ".join(blockers)
            + "\nUse method='mtp' (matrix products only; relative error about 3e-6 in float32 against the "
            "exact root) for these layers: build them with root='mtp' (timm models too: root='mtp'), "
            "or on a trained model set `model.get_submodule(name).root = covpool.RootOptions(method='mtp')` "
            "before exporting."
        )
    examples = _as_tuple(example)
    dynamic_shapes = None
    if dynamic_batch:
        if any(t.ndim == 0 or t.shape[0] < 2 for t in examples):
            shapes = [tuple(t.shape) for t in examples]
            raise ValueError(
                f"dynamic_batch=True needs example inputs with a batch dimension of at least 2 "
                f"(torch.export fixes a dimension of size 1), got shapes {shapes}"
            )
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in examples)
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f'export_onnx needs {" and ".join(missing)}: pip install "covpool[export]"')
    with traced_at_full_precision():
        program = torch.onnx.export(
            model,
            examples,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            verbose=False,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path)
    return path
