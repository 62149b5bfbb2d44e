"""Run benchmark comparisons one by one with a progress bar, under a soft wall-time budget.

The budget is soft: a comparison (a group of cells timed against each other) that has started always
finishes, so a run can end later than the budget by up to one comparison; once the budget is spent no
new comparison starts. No cell is dropped: every cell of a comparison that did not run still gets a row,
with the reason in its ``note``, and is listed in ``missing``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from tqdm.auto import tqdm

from covpool.bench.timing import Timer, error_message

Item = TypeVar("Item")


@dataclass
class BudgetResult(Generic[Item]):
    """A row for every cell in run order, the cells without measurements with why, and the wall time."""

    rows: list[dict] = field(default_factory=list)
    missing: list[tuple[Item, str]] = field(default_factory=list)
    elapsed_s: float = 0.0


def budget_reason(budget: float, elapsed: float) -> str:
    """The ``note`` of a cell whose comparison the budget left out."""
    return f"not run: time budget of {budget:g} s spent ({elapsed:.0f} s elapsed)"


def run_within_budget(
    items: Sequence[Item],
    run: Callable[[Item], dict],
    failed: Callable[[Item, str], dict],
    *,
    label: Callable[[Item], str],
    time_budget: float = math.inf,
    progress: bool = True,
    desc: str = "covpool.bench",
    unit: str = "cell",
) -> tuple[list[dict], list[Item]]:
    """``(rows, skipped)``: ``run(item)`` for each item in order, none started after ``time_budget`` s.

    For runs that are not compared by time (the examples' training runs); the benchmark's comparisons
    use :func:`run_groups_within_budget`. The progress bar is named ``desc``, counts in ``unit`` and
    shows ``label(item)`` of the running item. An item whose ``run`` raises ``RuntimeError`` gives the
    row ``failed(item, first line of the message)`` and the run goes on.

    Example:
        >>> rows, skipped = run_within_budget([1, 2], lambda i: {"i": i}, lambda i, m: {}, label=str,
        ...                                   progress=False)
        >>> rows, skipped
        ([{'i': 1}, {'i': 2}], [])
    """
    rows: list[dict] = []
    skipped: list[Item] = []
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
    for index, item in enumerate(items):
        if time.perf_counter() - start > time_budget:
            skipped = list(items[index:])
            break
        bar.set_postfix_str(label(item))
        try:
            rows.append(run(item))
        except RuntimeError as error:
            rows.append(failed(item, error_message(error)))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        bar.update()
    bar.close()
    return rows, skipped


def run_groups_within_budget(
    groups: Sequence[Sequence[Item]],
    run_group: Callable[[Sequence[Item]], list[dict]],
    missing: Callable[[Item, str], dict],
    *,
    label: Callable[[Sequence[Item]], str],
    time_budget: float = math.inf,
    progress: bool = True,
    desc: str = "covpool.bench",
    timer: Timer = time.perf_counter,
) -> BudgetResult[Item]:
    """``run_group(group)`` (one row per cell) for each group in order, none started after ``time_budget``.

    A group that starts later than ``time_budget`` seconds after the first gives ``missing(cell, reason)``
    rows for its cells, as does one whose ``run_group`` raises ``RuntimeError`` (an input that does not
    fit in memory); ``run_group`` reports its own cells' failures in their rows, and a row with a non-empty
    ``note`` but no time (``forward_ms`` NaN or absent) is listed in ``missing`` too. The progress bar,
    named ``desc``, counts cells and shows ``label(group)`` of the running group.

    Example:
        >>> result = run_groups_within_budget([[1, 2], [3]], lambda g: [{"i": i} for i in g],
        ...                                   lambda i, why: {"i": i, "note": why}, label=str,
        ...                                   progress=False)
        >>> result.rows, result.missing
        ([{'i': 1}, {'i': 2}, {'i': 3}], [])
    """
    result: BudgetResult[Item] = BudgetResult()
    start = timer()
    bar = tqdm(total=sum(map(len, groups)), desc=desc, unit="cell", disable=not progress, dynamic_ncols=True)
    for group in groups:
        elapsed = timer() - start
        if elapsed > time_budget:
            rows = [missing(item, budget_reason(time_budget, elapsed)) for item in group]
        else:
            bar.set_postfix_str(label(group))
            try:
                rows = run_group(group)
            except RuntimeError as error:
                rows = [missing(item, f"failed: {error_message(error)}") for item in group]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        for item, row in zip(group, rows, strict=True):
            time_ms = row.get("forward_ms", math.nan)
            if row.get("note") and (not isinstance(time_ms, float) or math.isnan(time_ms)):
                result.missing.append((item, row["note"]))
        result.rows.extend(rows)
        bar.update(len(group))
    bar.close()
    result.elapsed_s = timer() - start
    return result
