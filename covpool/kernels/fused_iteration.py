"""The coupled forward iteration fused into one Triton launch for small matrices (issue #18, item 2).

The reference it must match is :func:`covpool.linalg.iteration.coupled_root` (imported here as
:data:`reference`): the same schedule, the same coefficients, the same order of the coupled update
(``U = Z Y``, ``Y ← Y q(U)``, ``Z ← q(U) Z``, the first step from ``U = Â``, ``Z = I``). It is not copied
here: it is the path every other call takes, so the kernel is held to the code that runs. Where the two
differ is rounding only: the order of the sums inside a product, and for Padé steps a Cholesky
factorisation written out in the kernel where the reference calls LAPACK/cuSOLVER.

:func:`fused_coupled_root` launches :func:`covpool.kernels.triton_iteration.coupled_root_kernel` once for
the whole schedule, one program per matrix, the matrix held in registers, the products as ``tl.dot`` at
``input_precision="ieee"``: Triton's default for float32 operands is TF32, whose rounding the plans are
not certified for (:mod:`covpool.linalg.precision`). :func:`covpool.linalg.planner.plan_root` decides where
it runs; Triton is imported lazily, on the first launch: CPU builds of torch run without it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from covpool.linalg.iteration import coupled_root
from covpool.linalg.polynomial import best_block
from covpool.linalg.schedule import PadeStep, PolynomialStep, Schedule

reference = coupled_root
"""The plain-torch path the kernel must match (``(Â, schedule) → (Y, Z)``)."""

INPUT_PRECISION = "ieee"
"""``tl.dot``'s precision for float32 operands: IEEE, what the plans are certified for."""


def _pade_in_kernel(step: PadeStep) -> bool:
    """The kernel sums the powers of ``W`` directly; the reference does too where its Paterson-Stockmeyer
    block is ``d + 1`` (degrees up to 4, mpa's default 2 included)."""
    return best_block(step.degree, 2) == step.degree + 1


def schedule_in_kernel(schedule: Schedule) -> bool:
    """Whether the kernel runs ``schedule``: at least one step, all polynomial or all Padé of one degree
    (see :func:`_pade_in_kernel`)."""
    steps = schedule.steps
    if not steps:
        return False
    if all(isinstance(step, PolynomialStep) for step in steps):
        return True
    return all(isinstance(step, PadeStep) and step.degree == steps[0].degree for step in steps) and (
        _pade_in_kernel(steps[0])
    )


def tile_size(n: int) -> int:
    """The kernels' tile side for ``n × n`` matrices: the next power of two, at least 16 (``tl.dot``'s
    smallest).

    Warps per program are chosen by what ``ptxas -v`` reports for sm_90a (Triton 3.8, compiled without a
    GPU; no timings yet): the forward kernel spills nothing at tile 32 with 8 warps (190 bytes with 4) and
    least at tile 64 with 8 (2 KB; 0.6 KB for Padé steps; 16 warps spill more); the sign iteration spills
    nothing at tile 32 with 8 warps and least at tile 64 with 16 (2.8 KB; 23 KB with 8). At tile 128 the
    forward kernel needs 256 KB of shared memory, beyond any GPU's, which is why the planner stops at 64
    (:data:`covpool.kernels.MAX_N`)."""
    return max(16, 1 << (n - 1).bit_length())


def _table_rows(schedule: Schedule) -> list[list[float]]:
    """One row of floats per step, as the kernel reads them: ``c₀ … c_d`` then ``d`` in the last column
    (polynomial steps), or ``μ, -μ², p₀ … p_d, q₀ … q_d`` (Padé)."""
    steps = schedule.steps
    if isinstance(steps[0], PadeStep):
        return [[s.scale, -(s.scale**2), *s.numerator, *s.denominator] for s in steps]
    width = max(s.degree for s in steps) + 2
    return [[*s.coefficients, *[0.0] * (width - 2 - s.degree), float(s.degree)] for s in steps]


@functools.lru_cache(maxsize=128)
def device_table(
    rows: Callable[[Schedule], list[list[float]]], schedule: Schedule, device: torch.device
) -> torch.Tensor:
    """A kernel's step table, ``rows(schedule)`` on ``device``, ``(steps, width)`` float32; cached, so that a
    CUDA-graph capture after a warm-up call copies nothing from the host."""
    return torch.tensor(rows(schedule), dtype=torch.float32, device=device)


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Make ``tensor``'s GPU the current one for a launch (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def fused_coupled_root(A_hat: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, Z) ≈ (Â^(1/2), Â^(-1/2))`` after the steps of ``schedule``, in one launch.

    The planner decides where it runs (``RootPlan.fused_forward``); on CPU tensors the kernel runs only
    under ``TRITON_INTERPRET=1``, which the tests use). No graph is recorded.

    Shapes: ``A_hat (*, n, n)`` float32 → ``Y``, ``Z`` of the same shape. Each matrix is padded in
    registers to :func:`tile_size`.
    """
    from covpool.kernels.triton_iteration import coupled_root_kernel

    shape, n = A_hat.shape, A_hat.shape[-1]
    A = A_hat.detach().reshape(-1, n, n).contiguous()
    Y, Z = torch.empty_like(A), torch.empty_like(A)
    if A.shape[0] == 0:
        return Y.reshape(shape), Z.reshape(shape)
    table = device_table(_table_rows, schedule, A.device)
    first = schedule.steps[0]
    block = tile_size(n)
    # Triton launches on the current device, not the tensors'
    with on_device(A):
        coupled_root_kernel[(A.shape[0],)](
            A,
            Y,
            Z,
            table,
            n,
            len(schedule.steps),
            table.shape[1],
            first.degree,
            PADE=isinstance(first, PadeStep),
            BLOCK=block,
            INPUT_PRECISION=INPUT_PRECISION,
            num_warps=4 if block == 16 else 8,
        )
    return Y.reshape(shape), Z.reshape(shape)
