"""Error-versus-time Pareto plots of the matrix-root grid, one PNG per device, dtype and ``n``.

Each figure has one panel per function (rows) and batch size (columns). A point is a configuration:
x is its gradient error, y its forward+backward time, both on log scales, so better is down and to the
left. The Pareto front (configurations that no other one beats on both error and time) is the
dashed staircase. Figures are drawn with matplotlib's Agg canvas, without pyplot's global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

# Below this a relative error is drawn at the floor: it is float64 round-off, and log axes need > 0.
_ERROR_FLOOR = 1e-16


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points ``(error, time)`` not dominated by another (lower or equal on both), by error.

    Example:
        >>> pareto_front([(1e-3, 5.0), (1e-6, 9.0), (1e-4, 20.0), (1e-2, 1.0)])
        [(1e-06, 9.0), (0.001, 5.0), (0.01, 1.0)]
    """
    front: list[tuple[float, float]] = []
    for error, time in sorted(points):
        if not front or time < front[-1][1]:
            front.append((error, time))
    return front


def _plottable(row: dict) -> bool:
    values = (row["gradient_error"], row["forward_backward_ms"])
    return all(isinstance(value, float) and math.isfinite(value) for value in values)


def plot_pareto(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """Write ``pareto_<device>_<dtype>_n<n>.png`` for every group of ``rows`` with a finite point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for row in rows if _plottable(row)]
    paths = []
    for device, dtype, n in sorted({(row["device"], row["dtype"], row["n"]) for row in rows}):
        group = [row for row in rows if (row["device"], row["dtype"], row["n"]) == (device, dtype, n)]
        functions = list(dict.fromkeys(row["function"] for row in group))
        batches = sorted({row["batch"] for row in group})
        figure = Figure(figsize=(max(6.0, 4.2 * len(batches)), 3.8 * len(functions)), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(len(functions), len(batches), squeeze=False)
        for i, function in enumerate(functions):
            for j, batch in enumerate(batches):
                cells = [row for row in group if (row["function"], row["batch"]) == (function, batch)]
                _panel(axes[i][j], cells, title=f"{function}, batch {batch}")
        figure.suptitle(f"covpool.bench: n={n}, {device}, {dtype}; down and left is better")
        path = out_dir / f"pareto_{device}_{dtype}_n{n}.png".replace(":", "")
        figure.savefig(path, dpi=110)
        paths.append(path)
    return paths


def _panel(ax, rows: Sequence[dict], *, title: str) -> None:
    points = [(max(row["gradient_error"], _ERROR_FLOOR), row["forward_backward_ms"]) for row in rows]
    front = pareto_front(points)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("gradient relative error")
    ax.set_ylabel("forward+backward ms")
    ax.grid(True, which="both", alpha=0.25)
    if not points:
        return
    on_front = set(front)
    for row, point in zip(rows, points, strict=True):
        ax.scatter(*point, s=22, color="C3" if point in on_front else "C0", zorder=3)
        ax.annotate(row["config"], point, xytext=(3, 3), textcoords="offset points", fontsize=7)
    errors, times = zip(*front, strict=True)
    ax.step(errors, times, where="post", linestyle="--", color="C3", alpha=0.7, zorder=2)
