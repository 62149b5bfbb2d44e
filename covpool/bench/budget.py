"""Run benchmark items one by one with a progress bar until a wall-time budget is spent."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from tqdm.auto import tqdm

Item = TypeVar("Item")


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

    The progress bar is named ``desc``, counts in ``unit`` and shows ``label(item)`` of the running item.

    An item whose ``run`` raises ``RuntimeError`` (out of memory, a failed decomposition, a dtype a
    kernel lacks) gives the row ``failed(item, first line of the message)`` and the run goes on.

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
            message = str(error).strip().splitlines()
            rows.append(failed(item, message[0][:120] if message else type(error).__name__))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        bar.update()
    bar.close()
    return rows, skipped
