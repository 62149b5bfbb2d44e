"""Error-versus-time Pareto plots of the matrix-root grid, one PNG per device, dtype and ``n``.

Each figure has one panel per function (rows) and batch size (columns). A point is a configuration:
x is its gradient error, y its median forward+backward time, both on log scales, so better is down and
to the left; the vertical bar spans its fastest to slowest run. Configurations are told apart by colour
and marker, named in the figure's legend (no labels at the points, which overlap where points crowd).
In a rankable comparison (:mod:`covpool.bench.ranking`) the Pareto front (configurations that no other
one beats on both error and median time) is the dashed staircase, its points ringed in black; a panel
that is not rankable says so in red in its title and draws no front. Configurations of the panel
without a point are listed in it with the reason, and a panel where nothing ran says so. Figures are
drawn with matplotlib's Agg canvas, without pyplot's global state.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from covpool.bench.ranking import MAX_SPREAD

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


_MARKERS = "osD^vP*"  # 7 markers, coprime with the 10 colours: 70 distinct styles


def _plottable(row: dict) -> bool:
    values = (row["gradient_error"], row["forward_backward_ms"])
    return all(isinstance(value, float) and math.isfinite(value) for value in values)


def _legend_label(row: dict, verdict: dict | None) -> str:
    """The configuration's name, and what it runs where that is another configuration (``auto (runs
    eigh)``)."""
    twin = (verdict or {}).get("same", {}).get(row["config"])
    return f"{row['config']} (runs {twin})" if twin else row["config"]


def _shorten(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _missing_reason(row: dict) -> str:
    return _shorten(row["note"] or "no finite time or error", 60)


def plot_pareto(rows: Sequence[dict], comparisons: Sequence[dict], out_dir: Path) -> list[Path]:
    """Write ``pareto_<device>_<dtype>_n<n>.png`` for every device, dtype and ``n`` of ``rows`` (all
    planned cells, measured or not), with the verdicts of ``comparisons`` (:func:`covpool.bench.ranking.
    rank_rows`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    styles = {}
    for row in rows:
        if row["config"] not in styles:
            index = len(styles)
            styles[row["config"]] = {"color": f"C{index % 10}", "marker": _MARKERS[index % len(_MARKERS)]}
    verdicts = {(v["function"], v["device"], v["dtype"], v["n"], v["batch"]): v for v in comparisons}
    paths = []
    for device, dtype, n in sorted({(row["device"], row["dtype"], row["n"]) for row in rows}):
        group = [row for row in rows if (row["device"], row["dtype"], row["n"]) == (device, dtype, n)]
        functions = list(dict.fromkeys(row["function"] for row in group))
        batches = sorted({row["batch"] for row in group})
        figure = Figure(
            figsize=(max(6.0, 4.6 * len(batches)) + 2.6, 4.0 * len(functions)), layout="constrained"
        )
        FigureCanvasAgg(figure)
        axes = figure.subplots(len(functions), len(batches), squeeze=False)
        legend = {}
        for i, function in enumerate(functions):
            for j, batch in enumerate(batches):
                cells = [row for row in group if (row["function"], row["batch"]) == (function, batch)]
                verdict = verdicts.get((function, device, dtype, n, batch))
                legend |= _panel(axes[i][j], cells, verdict, styles, title=f"{function}, batch {batch}")
        if legend:
            figure.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8)
        figure.suptitle(f"covpool.bench: n={n}, {device}, {dtype}; down and left is better")
        path = out_dir / f"pareto_{device}_{dtype}_n{n}.png".replace(":", "")
        figure.savefig(path, dpi=110)
        paths.append(path)
    return paths


def _panel(ax, rows: Sequence[dict], verdict: dict | None, styles: dict, *, title: str) -> dict:
    """Draw one comparison; returns its legend entries ``{label: artist}``."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gradient relative error")
    ax.set_ylabel("forward+backward ms (median, min-max bar)")
    ax.grid(True, which="both", alpha=0.25)
    drawn = [row for row in rows if _plottable(row)]
    absent = [row for row in rows if not _plottable(row)]
    rankable = verdict is not None and verdict["rankable"]
    lines = [title]
    if drawn and not rankable:
        reason = "no verdict" if verdict is None else verdict["reason"]
        if verdict is not None and verdict["widest_spread"] > MAX_SPREAD:
            reason = f"spreads up to {verdict['widest_spread']:.2f}x (limit {MAX_SPREAD:g}x)"
        lines.append(f"NOT RANKABLE: {_shorten(reason)}")
    # The missing configurations grouped by reason: in the title where points are drawn (not over them).
    reasons: dict[str, list[str]] = {}
    for row in absent:
        reasons.setdefault(_missing_reason(row), []).append(row["config"])
    missing = [
        line
        for reason, names in reasons.items()
        for line in textwrap.wrap(f"{'missing ' if drawn else ''}{', '.join(names)}: {reason}", width=80)
    ]
    if drawn:
        lines += missing
    ax.set_title(
        "\n".join(lines), fontsize=9 if len(lines) > 1 else 10, color="C3" if len(lines) > 1 else "black"
    )
    if absent and not drawn:
        details = "\n".join(missing)
        ax.text(
            0.5,
            0.5,
            f"not run:\n{details}",
            transform=ax.transAxes,
            fontsize=7,
            ha="center",
            va="center",
            color="C3",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "C3"},
        )
    if not drawn:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.minorticks_off()
        return {}
    points = [(max(row["gradient_error"], _ERROR_FLOOR), row["forward_backward_ms"]) for row in drawn]
    front = set(pareto_front(points)) if rankable else set()
    entries = {}
    for row, (error, time) in zip(drawn, points, strict=True):
        low, high = row.get("forward_backward_min_ms", time), row.get("forward_backward_max_ms", time)
        style = styles[row["config"]]
        ax.errorbar(
            error,
            time,
            yerr=[[max(time - low, 0.0)], [max(high - time, 0.0)]],
            fmt=style["marker"],
            color=style["color"],
            markersize=6,
            capsize=2,
            markeredgecolor="black" if (error, time) in front else style["color"],
            markeredgewidth=1.4 if (error, time) in front else 0.0,
            zorder=3,
        )
        # The legend gets a plain proxy of the style, not a (possibly ringed) point.
        entries[_legend_label(row, verdict)] = Line2D(
            [], [], linestyle="none", marker=style["marker"], color=style["color"], markersize=6
        )
    # Plain numbers on the time axis; its minor ticks labelled only where it spans under a decade.
    plain = FuncFormatter(lambda value, _: f"{value:.0f}" if value >= 10 else f"{value:.3g}")
    ax.yaxis.set_major_formatter(plain)
    spans_a_decade = max(row["forward_backward_max_ms"] for row in drawn) >= 10 * min(
        row["forward_backward_min_ms"] for row in drawn
    )
    ax.yaxis.set_minor_formatter(NullFormatter() if spans_a_decade else plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    if front:
        errors, times = zip(*sorted(front), strict=True)
        ax.step(errors, times, where="post", linestyle="--", color="0.3", alpha=0.7, zorder=2)
    return entries
