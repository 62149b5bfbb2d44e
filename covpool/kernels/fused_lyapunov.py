"""The Lyapunov sign iteration fused into one Triton launch for small matrices (issue #18, item 2).

The reference it must match is :func:`covpool.linalg.lyapunov.solve_lyapunov` (imported here as
:data:`reference`, the one solver of ``Y X + X Y = C``; this is that solver's schedule run in one launch,
not another method): the same steps, the same block formulas with every scalar folded where the reference
folds it. They differ by rounding only (the order of the sums inside a product).

:func:`fused_solve_lyapunov` launches :func:`covpool.kernels.triton_lyapunov.sign_iteration_kernel` once
for the whole schedule, one program per matrix pair, its iterates in a scratch buffer and each product a
K-loop over it (:mod:`covpool.kernels.triton_tiles`), at the forward kernel's
:func:`covpool.kernels.fused_iteration.launch_config`, products as ``tl.dot`` at
:data:`covpool.kernels.fused_iteration.INPUT_PRECISION`. :mod:`covpool.linalg.planner` decides where it
runs.
"""

from __future__ import annotations

import torch

from covpool.kernels.fused_iteration import (
    INPUT_PRECISION,
    MAX_REGISTERS,
    device_table,
    launch_config,
    on_device,
)
from covpool.linalg.lyapunov import solve_lyapunov
from covpool.linalg.schedule import Schedule

reference = solve_lyapunov
"""The plain-torch solver the kernel must match (``(Y, C, schedule) → X``)."""

SCRATCH_TILES = 6
"""Scratch tiles per pair: ``B``, ``C``, ``B²``, ``BC``, ``T``, ``B K + c₀ C``
(:mod:`covpool.kernels.triton_lyapunov`)."""


def schedule_in_kernel(schedule: Schedule) -> bool:
    """Whether the kernel runs ``schedule``: sign steps of degree 1 or 2 (what the reference supports)."""
    return bool(schedule.steps) and all(step.degree in (1, 2) for step in schedule.steps)


def _table_rows(schedule: Schedule) -> list[list[float]]:
    """One row per step, as the kernel reads them: ``c₀, c₁, c₂, c₂ / c₁, d`` (the ratio in float64, as
    the reference computes it; zeros for degree 1)."""
    rows = []
    for step in schedule.steps:
        c = step.coefficients
        rows.append([*c, c[2] / c[1], 2.0] if len(c) == 3 else [*c, 0.0, 0.0, 1.0])
    return rows


def fused_solve_lyapunov(Y: torch.Tensor, C: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """``X`` with ``Y X + X Y = C`` by the sign iteration of ``schedule``, in one launch.

    The planner decides where it runs (``RootPlan.fused_backward``); on CPU tensors the kernel runs only
    under ``TRITON_INTERPRET=1``. No graph is recorded.

    Shapes: ``Y``, ``C`` ``(*, n, n)`` float32 → ``X`` of the same shape.
    """
    from covpool.kernels.triton_lyapunov import sign_iteration_kernel

    shape, n = Y.shape, Y.shape[-1]
    B = Y.detach().reshape(-1, n, n).contiguous()
    C = C.detach().reshape(-1, n, n).contiguous()
    X = torch.empty_like(C)
    if B.shape[0] == 0:
        return X.reshape(shape)
    block, block_k, warps, stages = launch_config(n)
    scratch = B.new_empty(B.shape[0], SCRATCH_TILES, block, block)
    # Triton launches on the current device, not the tensors'
    with on_device(B):
        sign_iteration_kernel[(B.shape[0],)](
            B,
            C,
            X,
            device_table(_table_rows, schedule, B.device),
            scratch,
            n,
            len(schedule.steps),
            BLOCK=block,
            BLOCK_K=block_k,
            INPUT_PRECISION=INPUT_PRECISION,
            num_warps=warps,
            num_stages=stages,
            maxnreg=MAX_REGISTERS,
        )
    return X.reshape(shape)
