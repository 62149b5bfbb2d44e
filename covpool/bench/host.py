"""Host time of an eager root call: ``python -m covpool.bench --host``.

An eager :func:`covpool.sqrtm` on CPU costs its operators' dispatch and compute plus covpool's own Python:
the options built from keywords and validated, the plan looked up (resolved once per options, size,
ridge, device type and dtype, then cached in :mod:`covpool.linalg.options`), the precision setting read.
For each method and size this prints the median wall time of a call (forward, and forward with the
backward of ``out.sum()``), the operators dispatched per call (every ``aten`` op, views included, as a
``TorchDispatchMode`` sees them), and the median time of the options and plan alone (``RootOptions``
from the keywords and :func:`covpool.linalg.planner.plan_root`), which is what a call costs beyond its
operators' own Python-to-kernel path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import covpool
from covpool.linalg.planner import RootPlan, plan_root
from covpool.numerics import working_dtype
from covpool.testing import random_spd

HOST_METHODS = ("eigh", "mtp", "mpa")
HOST_SIZES = (4, 32, 64)
HOST_BATCH = 64
HOST_CALLS = 200
HOST_SECONDS = 1.0
"""Calls timed per cell, after 5 untimed ones: ``HOST_CALLS``, or fewer where they would take more than
``HOST_SECONDS`` (at least 5); the median is printed."""


class _OpCount(TorchDispatchMode):
    """Counts the operators dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        self.count += 1
        return func(*args, **(kwargs or {}))


def _median_us(call: Callable[[], object], calls: int) -> float:
    for _ in range(5):
        call()
    times: list[float] = []
    while len(times) < calls and (len(times) < 5 or sum(times) < HOST_SECONDS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def _ops(call: Callable[[], object]) -> int:
    with _OpCount() as counter:
        call()
    return counter.count


def _row(method: str, A: torch.Tensor, calls: int) -> dict:
    n = A.shape[-1]
    leaf = A.clone().requires_grad_(True)

    def forward() -> torch.Tensor:
        return covpool.sqrtm(A, method=method)

    def forward_backward() -> None:
        covpool.sqrtm(leaf, method=method).sum().backward()

    def planning() -> RootPlan:
        options = covpool.RootOptions(method=method)
        return plan_root(options, n, eps=0.0, device=A.device, dtype=working_dtype(A.dtype))

    return {
        "method": method,
        "n": n,
        "batch": A.shape[0],
        "forward_us": round(_median_us(forward, calls), 1),
        "forward_ops": _ops(forward),
        "forward_backward_us": round(_median_us(forward_backward, calls), 1),
        "forward_backward_ops": _ops(forward_backward),
        "options_plan_us": round(_median_us(planning, calls), 2),
    }


def host_rows(
    methods: tuple[str, ...] = HOST_METHODS,
    sizes: tuple[int, ...] = HOST_SIZES,
    batch: int = HOST_BATCH,
    calls: int = HOST_CALLS,
) -> list[dict]:
    """One row per size and method (float32, CPU): call times, operators per call, options and plan time."""
    rows = []
    for n in sizes:
        A = random_spd(batch, n=n, condition=100, dtype=torch.float32)
        rows.extend(_row(method, A, calls) for method in methods)
    return rows
