"""Layer benchmark: forward and forward+backward time and memory of covpool's layers at typical sizes.

Each layer is built once per root ``method`` of :func:`covpool.sqrtm` (e.g. the default ``"auto"``
against ``"eigh"``, DBN's choice, and ``"ns"``, iSQRT-COV's / IterNorm's), in training mode, and
differentiated with respect to its input and all its parameters. The methods of one layer on one device
and dtype are a comparison: timed with their repeats interleaved
(:func:`covpool.bench.timing.measure_interleaved`) and ranked by :mod:`covpool.bench.ranking`.

Cases:

- ``CovPoolHead``: ResNet-50 stage-4 features ``(32, 2048, 7, 7)``, reduced to 256 channels, 1000 classes.
- ``SecondOrderTokenHead``: ViT-S tokens ``(64, 197, 384)``, reduced to 64 dimensions, 1000 classes.
- ``ZCABatchNorm2d``: 64 channels in groups of 16, 32 and 64, maps ``(32, 64, 32, 32)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

import covpool
from covpool.bench.budget import BudgetResult, run_groups_within_budget
from covpool.bench.ranking import ROW_TIMES, rank_rows, time_fields
from covpool.bench.timing import Timer, measure_interleaved
from covpool.linalg import RootOptions
from covpool.linalg.planner import plan_root
from covpool.numerics import working_dtype

LayerBuilder = Callable[..., nn.Module]
"""``builder(root=..., device=..., dtype=...)`` returns the layer."""


@dataclass(frozen=True)
class LayerCase:
    """A layer at one typical size: a builder taking ``root``, ``device``, ``dtype``, its input, and the
    size of the matrices it takes roots of."""

    name: str
    build: LayerBuilder
    input_shape: tuple[int, ...]
    matrix_size: int


def _zca(group_size: int) -> LayerCase:
    def build(**factory) -> nn.Module:
        return covpool.ZCABatchNorm2d(64, group_size=group_size, **factory)

    return LayerCase(f"ZCABatchNorm2d-g{group_size}", build, (32, 64, 32, 32), group_size)


def _covpool_head(**factory) -> nn.Module:
    return covpool.CovPoolHead(2048, 1000, reduction_dim=256, **factory)


def _token_head(**factory) -> nn.Module:
    return covpool.SecondOrderTokenHead(384, 1000, reduction_dim=64, **factory)


LAYER_CASES: dict[str, LayerCase] = {
    case.name: case
    for case in (
        LayerCase("CovPoolHead", _covpool_head, (32, 2048, 7, 7), 256),
        LayerCase("SecondOrderTokenHead", _token_head, (64, 197, 384), 64),
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

    def runs(self) -> str:
        """The method the layer runs: what ``"auto"`` resolves to on this device and dtype."""
        size, dtype = LAYER_CASES[self.layer].matrix_size, working_dtype(getattr(torch, self.dtype))
        return plan_root(
            RootOptions(method=self.method), size, eps=0.0, device=torch.device(self.device), dtype=dtype
        ).method


def _row(cell: LayerCell, **values) -> dict:
    shape = "x".join(map(str, LAYER_CASES[cell.layer].input_shape))
    nan = dict.fromkeys((*ROW_TIMES, "saved_mib", "peak_mib"), math.nan)
    base = {**asdict(cell), "runs": cell.runs(), "input": shape, **nan, "spread": math.nan, "rank": None}
    return {**base, "note": "", **values}


def run_layer_comparison(
    cells: Sequence[LayerCell],
    *,
    warmup: int = 1,
    repeats: int = 5,
    seed: int = 0,
    timer: Timer = time.perf_counter,
) -> list[dict]:
    """Rows of the methods ``cells`` of one layer, device and dtype (training mode, gradients to the input
    and every parameter), their repeats interleaved; a failure is a row of NaNs with the message."""
    case = LAYER_CASES[cells[0].layer]
    dtype = getattr(torch, cells[0].dtype)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(case.input_shape, generator=generator).to(cells[0].device, dtype).requires_grad_()
    cases = {}
    for cell in cells:
        torch.manual_seed(seed)
        layer = case.build(root=cell.method, device=cell.device, dtype=dtype).train()
        wrt = [x, *(p for p in layer.parameters() if p.requires_grad)]
        cases[cell] = (lambda layer=layer: layer(x), wrt)
    measurements, failures = measure_interleaved(
        cases, device=x.device, warmup=warmup, repeats=repeats, timer=timer
    )
    rows = []
    for cell in cells:
        if cell in measurements:
            m = measurements[cell]
            rows.append(_row(cell, **time_fields(m), saved_mib=m.saved_mib, peak_mib=m.peak_mib))
        else:
            rows.append(_row(cell, note=f"failed: {failures[cell]}"))
    return rows


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
) -> tuple[BudgetResult[LayerCell], list[dict]]:
    """``(result, verdicts)``: rows of every layer × method × device × dtype, the methods of one layer,
    device and dtype compared, under the soft ``time_budget`` (:mod:`covpool.bench.budget`)."""
    groups = [
        [LayerCell(layer, method, device, dtype) for method in methods]
        for device in devices
        for dtype in dtypes
        for layer in layers
    ]
    result = run_groups_within_budget(
        groups,
        lambda group: run_layer_comparison(group, warmup=warmup, repeats=repeats, seed=seed),
        lambda cell, reason: _row(cell, note=reason),
        label=lambda group: f"{group[0].layer} {group[0].device} {group[0].dtype}",
        time_budget=time_budget,
        progress=progress,
        desc="covpool.bench --layers",
    )
    verdicts, start = [], 0
    for group in groups:
        rows = result.rows[start : start + len(group)]
        names = {row["method"] for row in rows}
        same = {
            row["method"]: row["runs"] for row in rows if row["method"] == "auto" and row["runs"] in names
        }
        verdicts.append(rank_rows(rows, ("layer", "device", "dtype"), name="method", same=same))
        start += len(group)
    return result, verdicts
