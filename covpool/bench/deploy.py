"""CPU inference latency of an exported model: ONNX Runtime next to eager PyTorch (``--deploy``).

A registered covpool model (random weights, ``num_classes=1000``, eval) is exported with
:func:`covpool.export_onnx` (dynamic batch) and run on the same random images at each batch size by:

- ``pytorch``: eager PyTorch under :func:`torch.inference_mode`, the model as built (``root="auto"``,
  which is ``eigh`` on CPU);
- ``pytorch-mtp``: the same weights with ``root="mtp"``, the root method the exported graph computes
  (``"auto"`` resolves to a matmul method when traced), so that the runtime and the method can be told apart;
- ``onnxruntime``: an ONNX Runtime CPU session of the exported file.

All three use ``torch.get_num_threads()`` threads. Each row gives the median milliseconds per batch, the time
relative to ``pytorch`` and the relative Frobenius difference of the logits from ``pytorch``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from covpool.bench.timing import median_ms
from covpool.export import export_onnx

DEPLOY_MODELS = ("resnet18_isqrtcov", "resnet50_isqrtcov", "vit_small_patch16_224_sovit")
DEPLOY_BATCHES = (1, 32)


def _relative_difference(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


def _engines(
    model: nn.Module, matmul_model: nn.Module, session: Any, images: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    """The three ways to compute the logits of ``images``, by engine name (see the module docstring)."""

    def eager(net: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return net(images)

    feed = {session.get_inputs()[0].name: images.numpy()}
    return {
        "pytorch": lambda: eager(model),
        "pytorch-mtp": lambda: eager(matmul_model),
        "onnxruntime": lambda: torch.from_numpy(session.run(None, feed)[0]),
    }


def run_deploy(
    *,
    model_name: str,
    batches: Sequence[int],
    out: Path,
    warmup: int,
    repeats: int,
    seed: int,
) -> tuple[list[dict], dict]:
    """Export ``model_name`` to ``out/<model_name>.onnx`` and time the three engines at every batch size.

    Returns:
        The rows (one per batch size and engine) and facts about the run (export seconds, threads, input).
    """
    try:
        import onnxruntime
    except ModuleNotFoundError as error:
        raise SystemExit(
            '--deploy needs onnxruntime, onnx and onnxscript: pip install "covpool[export]"'
        ) from error
    torch.manual_seed(seed)
    model = timm.create_model(model_name).eval()
    matmul_model = timm.create_model(model_name, root="mtp").eval()
    matmul_model.load_state_dict(model.state_dict())
    image_shape = model.pretrained_cfg["input_size"]
    threads = torch.get_num_threads()

    start = time.perf_counter()
    path = export_onnx(model, torch.randn(2, *image_shape), out / f"{model_name}.onnx")
    export_s = time.perf_counter() - start
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    rows = []
    for batch in batches:
        images = torch.randn(batch, *image_shape, generator=torch.Generator().manual_seed(seed))
        engines = _engines(model, matmul_model, session, images)
        reference = engines["pytorch"]()
        baseline_ms = None
        for engine, step in engines.items():
            ms = median_ms(step, device=torch.device("cpu"), warmup=warmup, repeats=repeats)
            baseline_ms = baseline_ms or ms
            rows.append(
                {
                    "model": model_name,
                    "batch": batch,
                    "engine": engine,
                    "ms": ms,
                    "relative_time": ms / baseline_ms,
                    "logits_difference": _relative_difference(step(), reference),
                }
            )
    facts = {"onnx_file": str(path), "export_s": export_s, "threads": threads, "input": list(image_shape)}
    return rows, facts
