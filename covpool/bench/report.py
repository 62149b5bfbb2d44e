"""Benchmark rows to CSV, JSON and aligned text tables, one block per comparison with its verdict."""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import covpool
from covpool.bench.ranking import VERDICT_FIELDS


def record(args: argparse.Namespace) -> dict:
    """What a results file says of its run: ``environment`` (versions, platform, CPU threads, the CUDA
    device, the command) and ``settings`` (the parsed arguments, paths as text)."""
    environment = {
        "covpool": covpool.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "command": " ".join(sys.argv),
    }
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    return {"environment": environment, "settings": settings}


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """All ``rows`` (dicts with the same keys) as CSV with a header; NaN is written as an empty field."""
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if _is_nan(value) else value for key, value in row.items()})


def write_json(payload: dict, path: Path) -> None:
    """``payload`` as indented JSON; NaN and ±inf become ``null`` so that strict JSON readers accept it."""
    path.write_text(json.dumps(_finite_or_none(payload), indent=2, allow_nan=False) + "\n")


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """``columns`` of ``rows`` as a text table, numbers right-aligned, floats to 3 significant digits.

    Example:
        >>> print(format_table([{"config": "mpa", "forward_ms": 1.23456}], ["config", "forward_ms"]))
        config  forward_ms
        mpa           1.23
    """
    cells = [[_format(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    numeric = [
        all(_is_number(row[column]) for row in rows if row.get(column) is not None) for column in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(columns)] + [line(values) for values in cells])


def format_spread(row: dict, prefix: str) -> str:
    """``"min / median / max"`` of the ``{prefix}_min_ms``, ``{prefix}_ms``, ``{prefix}_max_ms`` of ``row``.

    Example:
        >>> format_spread({"forward_min_ms": 1.0, "forward_ms": 1.234, "forward_max_ms": 12.5}, "forward")
        '1.00 / 1.23 / 12.5'
    """
    values = (row[f"{prefix}_min_ms"], row[f"{prefix}_ms"], row[f"{prefix}_max_ms"])
    return "-" if _is_nan(values[1]) else " / ".join(map(_format, values))


def verdict_line(verdict: dict, label: str) -> str:
    """The heading of one comparison's block: ranked, NOT RANKABLE with why, or NOT RUN."""
    if verdict["rankable"]:
        spread = verdict["widest_spread"]
        line = f"== {label}: ranked (widest spread {spread:.2f}x)"
    elif verdict["reason"] == "nothing timed":
        return f"== {label}: NOT RUN (no configuration timed)"
    else:
        line = f"== {label}: NOT RANKABLE: {verdict['reason']}"
    if verdict["missing"]:
        line += f"; missing: {', '.join(verdict['missing'])}"
    return line


def format_comparisons(
    rows: Sequence[dict], verdicts: Sequence[dict], columns: Sequence[str], labels: Sequence[str]
) -> str:
    """``rows`` as one table with aligned columns, cut into consecutive blocks of the comparisons of
    ``verdicts`` (as many rows each as it has), each under its :func:`verdict_line` with its label.

    The time spreads are shown as ``min / median / max`` in the columns ``forward ms`` and
    ``forward+backward ms``.
    """
    display = [
        {
            **row,
            "forward ms": format_spread(row, "forward"),
            "forward+backward ms": format_spread(row, "forward_backward"),
            "spread": "-" if _is_nan(row["spread"]) else f"{row['spread']:.2f}x",
        }
        for row in rows
    ]
    table = format_table(display, columns).splitlines()
    lines, start = [table[0]], 1
    sizes = _block_sizes(rows, verdicts)
    for verdict, label, size in zip(verdicts, labels, sizes, strict=True):
        lines.append(verdict_line(verdict, label))
        lines.extend(table[start : start + size])
        start += size
    return "\n".join(lines)


def _block_sizes(rows: Sequence[dict], verdicts: Sequence[dict]) -> list[int]:
    if not verdicts:
        return []
    keys = [key for key in verdicts[0] if key not in VERDICT_FIELDS]
    sizes = []
    start = 0
    for verdict in verdicts:
        size = 0
        while start + size < len(rows) and all(rows[start + size][k] == verdict[k] for k in keys):
            size += 1
        sizes.append(size)
        start += size
    if start != len(rows):
        raise ValueError("rows are not in the order of the comparisons of verdicts")
    return sizes


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _format(value: object) -> str:
    if value is None or _is_nan(value):
        return "-"
    if isinstance(value, float):
        if 1e-2 <= abs(value) < 1e6:  # 3 significant digits without an exponent: 0.0161, 7.64, 4990
            return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"
        return f"{value:.3g}"
    return str(value)


def _finite_or_none(value: object) -> object:
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
