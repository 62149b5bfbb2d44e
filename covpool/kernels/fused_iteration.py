"""The coupled forward iteration fused into one Triton launch for small matrices (issue #18, item 2).

The reference it must match is :func:`covpool.linalg.iteration.coupled_root` (imported here as
:data:`reference`): the same schedule, the same coefficients, the same order of the coupled update
(``U = Z Y``, ``Y ← Y q(U)``, ``Z ← q(U) Z``, the first step from ``U = Â``, ``Z = I``). It is not copied
here: it is the path every other call takes, so the kernel is held to the code that runs. Where the two
differ is rounding only: the order of the sums inside a product, and for Padé steps a Cholesky
factorisation written out in the kernel where the reference calls LAPACK/cuSOLVER.

:func:`fused_coupled_root` launches :func:`covpool.kernels.triton_iteration.coupled_root_kernel` once for
the whole schedule, one program per matrix, its iterates in a scratch buffer and each product a K-loop over
it (:mod:`covpool.kernels.triton_tiles`), at the :func:`launch_config` that the ahead-of-time compile
(:mod:`covpool.kernels.aot`) finds free of spills. The products run as ``tl.dot`` at
:data:`INPUT_PRECISION`, ``"tf32x3"``: three TF32 tensor-core products per float32 product, whose rounding
the plans of fused calls are certified for (:data:`SPLIT_EPSILON`; Triton's default, one TF32 product, is
not certified). :func:`covpool.linalg.planner.plan_root` decides where it runs; Triton is imported
lazily, on the first launch: CPU builds of torch run without it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from covpool.linalg.emulation import TF32X3_ROUNDOFF
from covpool.linalg.iteration import coupled_root
from covpool.linalg.polynomial import best_block
from covpool.linalg.schedule import PadeStep, PolynomialStep, Schedule

reference = coupled_root
"""The plain-torch path the kernel must match (``(Â, schedule) → (Y, Z)``)."""

INPUT_PRECISION = "tf32x3"
"""``tl.dot``'s precision for float32 operands: each operand split into a TF32 head and a float32 tail, the
product ``a_lo b_hi + a_hi b_lo + a_hi b_hi`` on tensor cores with float32 accumulation; certified at
:data:`SPLIT_EPSILON`. The interpreter ignores it and forms float32 products."""

SPLIT_EPSILON = torch.finfo(torch.float32).eps + 2.0 * TF32X3_ROUNDOFF["truncation"]
"""Machine epsilon at which the plans certify the kernels' ``tf32x3`` products: ``2 (u + ρ)`` = 2.50e-6,
21 float32 epsilons (``u = 2^-24``, float32's unit roundoff; ``ρ`` the split's error per elementwise
product).

Derivation. The rounding models (:func:`covpool.linalg.iteration.residual_rounding`,
:func:`covpool.linalg.lyapunov.rounding_error`) are linear in the machine epsilon ``2u`` of the products,
and rest on the usual model of a float32 product ``C = A B``: each elementwise product ``a b`` and each
addition of the accumulation errs by at most ``u`` relative, so that
``|fl(C) - C| <= γ_n(u) |A| |B|`` with ``γ_n(u) = n u / (1 - n u)``. Triton's split (its ``F32DotTC`` pass)
takes ``a_hi = cvt.rna.tf32(a)`` (``|a - a_hi| <= 2^-11 |a|``, ``a_lo = a - a_hi`` exact in float32), and the
tensor core truncates ``a_lo`` to TF32 (relative ``2^-10``). Every TF32 product is exact in the float32
accumulator (11 + 11 significant bits), so the three terms of one elementwise product are
``a b (1 + η)`` with ``|η| <= ρ = 5 · 2^-22 + 2^-31`` (dropping ``a_lo b_lo`` and the truncated bits; the
derivation and the exact-arithmetic check are :data:`covpool.linalg.emulation.TF32X3_ROUNDOFF`'s), and each
addition of the float32 accumulation still errs by ``u``. A term of ``C`` thus carries
``(1 + η)(1 + δ)^(n-1)`` with ``|δ| <= u``: at most ``ρ + γ_(n-1)(u)(1 + ρ) <= γ_n(u + ρ)``. So every bound of
the float32 model holds for the split products at unit roundoff ``u + ρ``, which is the model evaluated at
machine epsilon ``2 (u + ρ)``: the plans of a fused call are certified there
(:func:`covpool.linalg.planner._fused`), and ``tests/test_kernels_aot.py`` runs the reference schedules
under :func:`covpool.linalg.emulation.emulated_products` ``("tf32x3")`` within those certificates. It is
conservative by about the share of the accumulation in the error (which the split leaves at ``u``)."""


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
    smallest)."""
    return max(16, 1 << (n - 1).bit_length())


LAUNCH = {16: (16, 4, 1), 32: (16, 4, 1), 64: (16, 8, 1)}
"""``tile → (BLOCK_K, num_warps, num_stages)`` of every kernel: the K-slice of the products, the warps per
program and the software pipeline's stages of the K-loop (1: none; its buffers would cost registers and
shared memory for little, the loop being a few slices long). Chosen by the ahead-of-time compile
(``python -m covpool.kernels.aot``; Triton 3.8's ptxas, no GPU, no timings yet) as what spills nothing on
sm_80, sm_90 and sm_100 for every kernel: ``BLOCK_K = 32`` spills at tile 64 on sm_80, 16 warps leave ptxas
64 registers a thread and spill kilobytes."""

MAX_REGISTERS = 255
"""``maxnreg`` of every launch: without it ptxas caps some kernels itself (80 or 128 registers at 4 warps,
128 at 8 on sm_100) and spills; with it none spills (the AOT table)."""


def launch_config(n: int) -> tuple[int, int, int, int]:
    """``(BLOCK, BLOCK_K, num_warps, num_stages)`` of a launch for ``n × n`` matrices (:data:`LAUNCH`)."""
    block = tile_size(n)
    return (block, *LAUNCH[block])


def scratch_tiles(pade: bool) -> int:
    """Tiles of scratch per matrix: ``Y``, ``Z``, ``U``, the tail (polynomial steps), and for Padé steps
    ``P`` and ``Q`` as well (:mod:`covpool.kernels.triton_iteration`)."""
    return 6 if pade else 4


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
    scratch to :func:`tile_size` (``scratch_tiles`` tiles of it per matrix, 16 KB each at tile 64).
    """
    from covpool.kernels.triton_iteration import coupled_root_kernel

    shape, n = A_hat.shape, A_hat.shape[-1]
    A = A_hat.detach().reshape(-1, n, n).contiguous()
    Y, Z = torch.empty_like(A), torch.empty_like(A)
    if A.shape[0] == 0:
        return Y.reshape(shape), Z.reshape(shape)
    table = device_table(_table_rows, schedule, A.device)
    first = schedule.steps[0]
    pade = isinstance(first, PadeStep)
    block, block_k, warps, stages = launch_config(n)
    scratch = A.new_empty(A.shape[0], scratch_tiles(pade), block, block)
    # Triton launches on the current device, not the tensors'
    with on_device(A):
        coupled_root_kernel[(A.shape[0],)](
            A,
            Y,
            Z,
            table,
            scratch,
            n,
            len(schedule.steps),
            table.shape[1],
            first.degree,
            PADE=pade,
            BLOCK=block,
            BLOCK_K=block_k,
            INPUT_PRECISION=INPUT_PRECISION,
            num_warps=warps,
            num_stages=stages,
            maxnreg=MAX_REGISTERS,
        )
    return Y.reshape(shape), Z.reshape(shape)
