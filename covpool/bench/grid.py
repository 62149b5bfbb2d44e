"""The matrix-root benchmark grid: configuration × function × device × dtype × n × batch, under a time budget.

Each cell times one configuration of :mod:`covpool.bench.configs` on ``random_spd(batch, n=n,
condition=condition)`` (:mod:`covpool.bench.timing`) and reports its forward and gradient errors
against the float64 references of :mod:`covpool.testing`. The errors do not depend on the batch size,
so they are computed once per ``(configuration, function, device, dtype, n)`` on ``error_batch`` other
matrices of the same spectrum, and the largest per-matrix relative Frobenius error is reported.

A *comparison* is the cells of one function, device, dtype, ``n`` and batch: every configuration on the
same input. Its cells are timed together, their repeats interleaved
(:func:`covpool.bench.timing.measure_interleaved`), and ranked or declared not rankable by
:mod:`covpool.bench.ranking`. Comparisons run from the smallest ``n`` and batch up; once the soft time
budget is spent no new comparison starts, and its cells get rows that say so (:mod:`covpool.bench.budget`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from covpool.bench.budget import run_groups_within_budget
from covpool.bench.configs import CONFIGS, RootConfig
from covpool.bench.ranking import ROW_TIMES, rank_rows, time_fields
from covpool.bench.timing import (
    Timer,
    error_message,
    measure_interleaved,
    upstream_gradient,
)
from covpool.testing import random_spd, reference_gradient, reference_root, relative_error

FUNCTIONS = {"sqrtm": False, "inv_sqrtm": True}
"""Benchmarked functions and whether they are the inverse root."""


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    config: str
    function: str
    device: str
    dtype: str
    n: int
    batch: int

    def label(self) -> str:
        """Short human-readable name, e.g. ``mpa sqrtm cpu float32 n=64 b=16``."""
        return f"{self.config} {self.function} {self.device} {self.dtype} n={self.n} b={self.batch}"

    def comparison(self) -> tuple[str, str, str, int, int]:
        """``(function, device, dtype, n, batch)``: the cells with equal values are compared."""
        return (self.function, self.device, self.dtype, self.n, self.batch)


def comparison_label(function: str, device: str, dtype: str, n: int, batch: int) -> str:
    """E.g. ``sqrtm cpu float32 n=64 batch=16``."""
    return f"{function} {device} {dtype} n={n} batch={batch}"


@dataclass
class GridResult:
    """A row for every planned cell (in run order), the cells without measurements with the reason, one
    verdict per comparison (:func:`covpool.bench.ranking.rank_rows`) and the wall time."""

    rows: list[dict] = field(default_factory=list)
    missing: list[tuple[Cell, str]] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0


def plan_grid(
    *,
    configs: Sequence[str],
    functions: Sequence[str],
    devices: Sequence[str],
    dtypes: Sequence[str],
    sizes: Sequence[int],
    batches: Sequence[int],
) -> tuple[list[Cell], list[Cell]]:
    """``(cells to run, unsupported cells)`` in run order: device, dtype, n, batch, then function, config.

    Example:
        >>> cells, unsupported = plan_grid(configs=["mpa", "eigh"], functions=["sqrtm"], devices=["cpu"],
        ...                                dtypes=["float32"], sizes=[32], batches=[1, 4])
        >>> len(cells), unsupported
        (4, [])
    """
    cells, unsupported = [], []
    for device in devices:
        for dtype in dtypes:
            for n in sorted(sizes):
                for batch in sorted(batches):
                    for function in functions:
                        for config in configs:
                            cell = Cell(config, function, device, dtype, n, batch)
                            supported = CONFIGS[config].has_inverse or not FUNCTIONS[function]
                            (cells if supported else unsupported).append(cell)
    return cells, unsupported


def _spd(count: int, n: int, condition: float, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return random_spd(count, n=n, condition=condition, generator=generator).to(device, dtype)


def accuracy(config: RootConfig, A: torch.Tensor, *, inverse: bool) -> tuple[float, float]:
    """Largest relative Frobenius errors ``(forward, gradient)`` over the batch ``A`` (``(b, n, n)``).

    The gradient is that of ``⟨G, A^(±1/2)⟩`` for the fixed upstream ``G`` of
    :func:`covpool.bench.timing.upstream_gradient`; the references are computed in float64 from ``A``
    as given (its rounding to a low precision dtype is not counted as error).
    """
    A = A.detach().requires_grad_()
    out = config.root(A, inverse)
    grad_out = upstream_gradient(out)
    (grad,) = torch.autograd.grad(out, A, grad_out)
    exact = reference_root(A.detach(), inverse=inverse)
    exact_grad = reference_gradient(A.detach(), grad_out, inverse=inverse)
    return (
        relative_error(out.detach(), exact).max().item(),
        relative_error(grad, exact_grad).max().item(),
    )


def _row(cell: Cell, runs: str = "", **values) -> dict:
    nan = dict.fromkeys((*ROW_TIMES, "saved_mib", "peak_mib", "forward_error", "gradient_error"), math.nan)
    return {**asdict(cell), "runs": runs, **nan, "spread": math.nan, "rank": None, "note": "", **values}


def run_comparison(
    cells: Sequence[Cell],
    A: torch.Tensor,
    error_inputs: torch.Tensor,
    *,
    warmup: int,
    repeats: int,
    timer: Timer = time.perf_counter,
) -> list[dict]:
    """Rows of ``cells`` (one comparison) on the timing batch ``A`` (``(batch, n, n)``), repeats
    interleaved; errors from :func:`accuracy` on ``error_inputs``. A cell that raises ``RuntimeError``
    (out of memory, a failed decomposition, an unsupported dtype) gets NaNs and the message in ``note``."""
    rows, cases = {}, {}
    for cell in cells:
        config, inverse = CONFIGS[cell.config], FUNCTIONS[cell.function]
        runs = config.runs(cell.device, cell.dtype, cell.n)
        try:
            forward_error, gradient_error = accuracy(config, error_inputs, inverse=inverse)
        except RuntimeError as error:
            rows[cell] = _row(cell, runs, note=f"failed: {error_message(error)}")
            continue
        rows[cell] = _row(cell, runs, forward_error=forward_error, gradient_error=gradient_error)
        A_cell = A.detach().requires_grad_()
        cases[cell] = (lambda c=config, i=inverse, a=A_cell: c.root(a, i), [A_cell])
    measurements, failures = measure_interleaved(
        cases, device=A.device, warmup=warmup, repeats=repeats, timer=timer
    )
    for cell, measurement in measurements.items():
        rows[cell] |= {
            **time_fields(measurement),
            "saved_mib": measurement.saved_mib,
            "peak_mib": measurement.peak_mib,
        }
    for cell, message in failures.items():
        rows[cell]["note"] = f"failed: {message}"
    return [rows[cell] for cell in cells]


def auto_twins(rows: Sequence[dict]) -> dict[str, str]:
    """``{configuration: the configuration it runs}`` for the ``method="auto"`` configurations of
    ``rows`` whose resolved method is benchmarked as a configuration of its own (``auto`` → ``eigh``)."""
    names = {row["config"] for row in rows}
    return {
        row["config"]: row["runs"]
        for row in rows
        if (CONFIGS[row["config"]].options or {}).get("method") == "auto" and row["runs"] in names
    }


def group_cells(cells: Sequence[Cell]) -> list[list[Cell]]:
    """``cells`` cut into comparisons, in order of their first cell."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.comparison(), []).append(cell)
    return list(groups.values())


def run_grid(
    cells: Sequence[Cell],
    *,
    condition: float = 1e3,
    warmup: int = 1,
    repeats: int = 5,
    error_batch: int = 8,
    time_budget: float = math.inf,
    seed: int = 0,
    progress: bool = True,
) -> GridResult:
    """Run the comparisons of ``cells`` in order until ``time_budget`` seconds are spent (soft: a started
    comparison finishes); every cell gets a row, those not run with the reason in ``note``."""
    # Error inputs are shared by the batches of one n; only the latest is kept alive.
    error_inputs: dict[tuple, torch.Tensor] = {}

    def run(group: Sequence[Cell]) -> list[dict]:
        nonlocal error_inputs
        cell = group[0]
        dtype = getattr(torch, cell.dtype)
        error_key = (cell.device, cell.dtype, cell.n)
        if error_key not in error_inputs:
            error_inputs = {error_key: _spd(error_batch, cell.n, condition, dtype, cell.device, seed + 1)}
        A = _spd(cell.batch, cell.n, condition, dtype, cell.device, seed)
        return run_comparison(group, A, error_inputs[error_key], warmup=warmup, repeats=repeats)

    def missing(cell: Cell, reason: str) -> dict:
        return _row(cell, CONFIGS[cell.config].runs(cell.device, cell.dtype, cell.n), note=reason)

    budget = run_groups_within_budget(
        group_cells(cells),
        run,
        missing,
        label=lambda group: comparison_label(*group[0].comparison()),
        time_budget=time_budget,
        progress=progress,
    )
    keys = ("function", "device", "dtype", "n", "batch")
    comparisons, start = [], 0
    for group in group_cells(cells):
        rows = budget.rows[start : start + len(group)]
        comparisons.append(rank_rows(rows, keys, same=auto_twins(rows)))
        start += len(group)
    return GridResult(
        rows=budget.rows, missing=budget.missing, comparisons=comparisons, elapsed_s=budget.elapsed_s
    )


def describe_missing(missing: Sequence[tuple[Cell, str]]) -> str:
    """One line per comparison and reason: the configurations without measurements there."""
    groups: dict[tuple, list[str]] = {}
    for cell, reason in missing:
        groups.setdefault((cell.comparison(), reason), []).append(cell.config)
    return "\n".join(
        f"  {comparison_label(*comparison)}: {', '.join(configs)}: {reason}"
        for (comparison, reason), configs in groups.items()
    )
