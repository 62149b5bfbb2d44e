"""The coupled forward iteration fused into one Triton launch for small matrices (issue #18, item 2).

The reference it must match is :func:`covpool.linalg.iteration.coupled_root` (imported here as
:data:`reference`): the same schedule, the same coefficients, the same order of the coupled update
(``U = Z Y``, ``Y ← Y q(U)``, ``Z ← q(U) Z``, the first step from ``U = Â``, ``Z = I``). It is not copied
here: it is the path every other call takes, so the kernel is held to the code that runs. Where the two
differ is rounding only: the order of the sums inside a product, and for Padé steps a Cholesky
factorisation written out in the kernel where the reference calls LAPACK/cuSOLVER.

:func:`fused_coupled_root` launches :func:`covpool.kernels.triton_iteration.coupled_root_kernel` once for
the whole schedule, one program per matrix, the matrix held in registers (``n <= MAX_N``), the products
as ``tl.dot`` at ``input_precision="ieee"``: Triton's default for float32 operands is TF32, whose
rounding the plans are not certified for (:mod:`covpool.linalg.precision`).

:func:`uses_fused_kernel` is the one place that decides whether a call takes it: CUDA float32 input,
``n <= MAX_N``, a plan differentiated by the Lyapunov solver (the kernel keeps no iterates) at its
``"full"`` precision, polynomial steps or Padé steps of degree up to 4, Triton importable, not tracing
(``torch.compile``/``torch.export`` see the reference). :class:`covpool.linalg.roots.MatmulRoot` asks it.
Triton is imported lazily, on the first launch: CPU builds of torch run without it.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING

import torch

from covpool.linalg.iteration import coupled_root
from covpool.linalg.numerics import is_tracing
from covpool.linalg.polynomial import best_block
from covpool.linalg.schedule import PadeStep, PolynomialStep, Schedule

if TYPE_CHECKING:
    from covpool.linalg.options import RootPlan

reference = coupled_root
"""The plain-torch path the kernel must match (``(Â, schedule) → (Y, Z)``)."""

MAX_N = 64
"""Largest ``n`` dispatched to the kernel: a program holds about six ``64 × 64`` float32 tiles, which fit
the registers of one CUDA block. Larger ``n`` run correctly (checked at n = 100 in the interpreter) but are
not measured on a GPU, where their tiles would spill."""
INPUT_PRECISION = "ieee"
"""``tl.dot``'s precision for float32 operands: IEEE, what the plans are certified for."""


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (CPU builds of torch come without it)."""
    return importlib.util.find_spec("triton") is not None


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


def uses_fused_kernel(A_hat: torch.Tensor, plan: RootPlan) -> bool:
    """Whether the forward iteration of ``A_hat`` (``(*, n, n)``) under ``plan`` runs in the fused kernel:
    the one place that decides, checked in order of cost; the reference stays the path everywhere else.
    Only plans differentiated by the Lyapunov solver qualify (the fused adjoint needs the iterates the
    reference records)."""
    return (
        A_hat.is_cuda
        and A_hat.dtype == torch.float32
        and A_hat.shape[-1] <= MAX_N
        and plan.gradient == "lyapunov"
        and plan.precision == "full"
        and plan.forward is not None
        and not is_tracing()
        and schedule_in_kernel(plan.forward)
        and triton_available()
    )


def _table_rows(schedule: Schedule) -> list[list[float]]:
    """One row of floats per step, as the kernel reads them: ``c₀ … c_d`` then ``d`` in the last column
    (polynomial steps), or ``μ, -μ², p₀ … p_d, q₀ … q_d`` (Padé)."""
    steps = schedule.steps
    if isinstance(steps[0], PadeStep):
        return [[s.scale, -(s.scale**2), *s.numerator, *s.denominator] for s in steps]
    width = max(s.degree for s in steps) + 2
    return [[*s.coefficients, *[0.0] * (width - 2 - s.degree), float(s.degree)] for s in steps]


@functools.lru_cache(maxsize=64)
def _device_table(schedule: Schedule, device: torch.device) -> torch.Tensor:
    """The step table on ``device``, ``(steps, width)`` float32; cached, so that a CUDA-graph capture after
    a warm-up call copies nothing from the host."""
    return torch.tensor(_table_rows(schedule), dtype=torch.float32, device=device)


def fused_coupled_root(A_hat: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, Z) ≈ (Â^(1/2), Â^(-1/2))`` after the steps of ``schedule``, in one launch.

    The caller checks :func:`uses_fused_kernel` (on CPU tensors the kernel runs only under
    ``TRITON_INTERPRET=1``, which the tests use). No graph is recorded.

    Shapes: ``A_hat (*, n, n)`` float32 → ``Y``, ``Z`` of the same shape. Each matrix is padded in
    registers to the next power of two (at least 16, ``tl.dot``'s smallest tile).
    """
    from covpool.kernels.triton_iteration import coupled_root_kernel

    shape, n = A_hat.shape, A_hat.shape[-1]
    A = A_hat.detach().reshape(-1, n, n).contiguous()
    Y, Z = torch.empty_like(A), torch.empty_like(A)
    if A.shape[0] == 0:
        return Y.reshape(shape), Z.reshape(shape)
    table = _device_table(schedule, A.device)
    first = schedule.steps[0]
    block = max(16, 1 << (n - 1).bit_length())
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
        num_warps=4 if block <= 32 else 8,
    )
    return Y.reshape(shape), Z.reshape(shape)
