"""The matrix-root benchmark grid: configuration × function × device × dtype × n × batch, under a time budget.

Each cell times one configuration of :mod:`covpool.bench.configs` on ``random_spd(batch, n=n,
condition=condition)`` (:mod:`covpool.bench.timing`) and reports its forward and gradient errors
against the float64 references of :mod:`covpool.testing`. The errors do not depend on the batch size,
so they are computed once per ``(configuration, function, device, dtype, n)`` on ``error_batch`` other
matrices of the same spectrum, and the largest per-matrix relative Frobenius error is reported.

Cells run from the smallest ``n`` and batch up, all configurations of one size together, so a spent
budget leaves complete comparisons at the sizes that were reached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from covpool.bench.budget import run_within_budget
from covpool.bench.configs import CONFIGS, RootConfig
from covpool.bench.timing import measure, upstream_gradient
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


@dataclass
class GridResult:
    """Rows of the measured cells (in run order) and the cells the time budget left out."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)


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


def _row(cell: Cell, **values) -> dict:
    nan = {
        "forward_ms": math.nan,
        "forward_backward_ms": math.nan,
        "saved_mib": math.nan,
        "peak_mib": math.nan,
        "forward_error": math.nan,
        "gradient_error": math.nan,
        "note": "",
    }
    return {**asdict(cell), **nan, **values}


def run_cell(cell: Cell, A: torch.Tensor, errors: tuple[float, float], *, warmup: int, repeats: int) -> dict:
    """Measure ``cell`` on the timing batch ``A`` (``(batch, n, n)``); ``errors`` from :func:`accuracy`."""
    config, inverse = CONFIGS[cell.config], FUNCTIONS[cell.function]
    A = A.detach().requires_grad_()
    result = measure(lambda: config.root(A, inverse), [A], device=A.device, warmup=warmup, repeats=repeats)
    return _row(
        cell,
        forward_ms=result.forward_ms,
        forward_backward_ms=result.forward_backward_ms,
        saved_mib=result.saved_mib,
        peak_mib=result.peak_mib,
        forward_error=errors[0],
        gradient_error=errors[1],
    )


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
    """Run ``cells`` in order until ``time_budget`` seconds are spent; cells not started are ``skipped``.

    A cell that raises a ``RuntimeError`` (out of memory, a failed decomposition, an unsupported dtype)
    gives a row of NaNs with the message in ``note``, and the grid goes on.
    """
    # Inputs are shared by consecutive cells; only the latest of each kind is kept alive.
    timing_inputs: dict[tuple, torch.Tensor] = {}
    error_inputs: dict[tuple, torch.Tensor] = {}
    errors: dict[tuple, tuple[float, float]] = {}

    def run(cell: Cell) -> dict:
        nonlocal timing_inputs, error_inputs
        dtype = getattr(torch, cell.dtype)
        timing_key = (cell.device, cell.dtype, cell.n, cell.batch)
        error_key = (cell.device, cell.dtype, cell.n)
        if timing_key not in timing_inputs:
            timing_inputs = {timing_key: _spd(cell.batch, cell.n, condition, dtype, cell.device, seed)}
        if error_key not in error_inputs:
            error_inputs = {error_key: _spd(error_batch, cell.n, condition, dtype, cell.device, seed + 1)}
        accuracy_key = (cell.config, cell.function, *error_key)
        if accuracy_key not in errors:
            errors[accuracy_key] = accuracy(
                CONFIGS[cell.config], error_inputs[error_key], inverse=FUNCTIONS[cell.function]
            )
        return run_cell(cell, timing_inputs[timing_key], errors[accuracy_key], warmup=warmup, repeats=repeats)

    rows, skipped = run_within_budget(
        cells,
        run,
        lambda cell, message: _row(cell, note=message),
        label=Cell.label,
        time_budget=time_budget,
        progress=progress,
    )
    return GridResult(rows=rows, skipped=skipped)


def describe_skipped(cells: Sequence[Cell]) -> str:
    """One line per ``(device, dtype, n, batch)`` with the number of cells left out there."""
    groups: dict[tuple, int] = {}
    for cell in cells:
        key = (cell.device, cell.dtype, cell.n, cell.batch)
        groups[key] = groups.get(key, 0) + 1
    return "\n".join(
        f"  {device} {dtype} n={n} batch={batch}: {count} cell(s)"
        for (device, dtype, n, batch), count in groups.items()
    )
