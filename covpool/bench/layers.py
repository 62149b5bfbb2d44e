"""Layer benchmark: forward and forward+backward time and memory of covpool's layers at typical sizes.

Each layer is built once per root ``method`` of :func:`covpool.sqrtm` (e.g. the default ``"auto"``
against ``"eigh"``, DBN's choice, and ``"ns"``, iSQRT-COV's / IterNorm's), in training mode, and
differentiated with respect to its input and all its parameters (:func:`covpool.bench.timing.measure`).

Cases:

- ``CovPoolHead``: ResNet-50 stage-4 features ``(32, 2048, 7, 7)``, reduced to 256 channels, 1000 classes.
- ``SecondOrderTokenHead``: ViT-S tokens ``(64, 197, 384)``, reduced to 64 dimensions, 1000 classes.
- ``ZCABatchNorm2d``: 64 channels in groups of 16, 32 and 64, maps ``(32, 64, 32, 32)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

import covpool
from covpool.bench.budget import run_within_budget
from covpool.bench.timing import measure

LayerBuilder = Callable[..., nn.Module]
"""``builder(root=..., device=..., dtype=...)`` returns the layer."""


@dataclass(frozen=True)
class LayerCase:
    """A layer at one typical size: a builder taking ``root``, ``device``, ``dtype``, and its input."""

    name: str
    build: LayerBuilder
    input_shape: tuple[int, ...]


def _zca(group_size: int) -> LayerCase:
    def build(**factory) -> nn.Module:
        return covpool.ZCABatchNorm2d(64, group_size=group_size, **factory)

    return LayerCase(f"ZCABatchNorm2d-g{group_size}", build, (32, 64, 32, 32))


def _covpool_head(**factory) -> nn.Module:
    return covpool.CovPoolHead(2048, 1000, reduction_dim=256, **factory)


def _token_head(**factory) -> nn.Module:
    return covpool.SecondOrderTokenHead(384, 1000, reduction_dim=64, **factory)


LAYER_CASES: dict[str, LayerCase] = {
    case.name: case
    for case in (
        LayerCase("CovPoolHead", _covpool_head, (32, 2048, 7, 7)),
        LayerCase("SecondOrderTokenHead", _token_head, (64, 197, 384)),
        _zca(16),
        _zca(32),
        _zca(64),
    )
}
"""Benchmarked layers by name."""

LAYER_METHODS = ("auto", "mpa", "mtp", "ns", "eigh")
"""Default root methods compared for every layer."""


@dataclass(frozen=True)
class LayerCell:
    """One layer case with one root method on one device and dtype."""

    layer: str
    method: str
    device: str
    dtype: str

    def label(self) -> str:
        """Short human-readable name, e.g. ``CovPoolHead mpa cpu float32``."""
        return f"{self.layer} {self.method} {self.device} {self.dtype}"


def _row(cell: LayerCell, **values) -> dict:
    shape = "x".join(map(str, LAYER_CASES[cell.layer].input_shape))
    nan = {
        "forward_ms": math.nan,
        "forward_backward_ms": math.nan,
        "saved_mib": math.nan,
        "peak_mib": math.nan,
    }
    return {**asdict(cell), "input": shape, **nan, "note": "", **values}


def run_layer_cell(cell: LayerCell, *, warmup: int = 1, repeats: int = 5, seed: int = 0) -> dict:
    """Measure one layer cell (training mode, gradients to the input and every parameter)."""
    case = LAYER_CASES[cell.layer]
    dtype = getattr(torch, cell.dtype)
    torch.manual_seed(seed)
    layer = case.build(root=cell.method, device=cell.device, dtype=dtype).train()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(case.input_shape, generator=generator).to(cell.device, dtype).requires_grad_()
    wrt = [x, *(p for p in layer.parameters() if p.requires_grad)]
    result = measure(lambda: layer(x), wrt, device=x.device, warmup=warmup, repeats=repeats)
    return _row(
        cell,
        forward_ms=result.forward_ms,
        forward_backward_ms=result.forward_backward_ms,
        saved_mib=result.saved_mib,
        peak_mib=result.peak_mib,
    )


def run_layers(
    *,
    layers: Sequence[str],
    methods: Sequence[str],
    devices: Sequence[str],
    dtypes: Sequence[str],
    warmup: int = 1,
    repeats: int = 5,
    time_budget: float = math.inf,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], list[LayerCell]]:
    """``(rows, skipped)`` of every layer × method × device × dtype, within ``time_budget`` seconds."""
    cells = [
        LayerCell(layer, method, device, dtype)
        for device in devices
        for dtype in dtypes
        for layer in layers
        for method in methods
    ]
    return run_within_budget(
        cells,
        lambda cell: run_layer_cell(cell, warmup=warmup, repeats=repeats, seed=seed),
        lambda cell, message: _row(cell, note=message),
        label=LayerCell.label,
        time_budget=time_budget,
        progress=progress,
    )
