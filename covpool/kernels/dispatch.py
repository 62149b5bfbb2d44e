"""The one place that decides whether a root's forward iteration or its Lyapunov backward runs in a fused
Triton kernel (:mod:`covpool.kernels.fused_iteration`, :mod:`covpool.kernels.fused_lyapunov`) or in the
plain-torch reference, which stays the path everywhere else.

A kernel runs where all of these hold: the caller asked for it (``RootOptions(fused=True)``; off by default
until the kernels are measured on a GPU); real (not fake) CUDA float32 tensors; ``n <= MAX_N``; a plan
differentiated by the Lyapunov solver (the kernels keep no iterates for the fused adjoint or autograd) at
its ``"full"`` precision (the kernels' products are IEEE float32); a schedule the kernel runs; not
tracing (``torch.compile`` and ``torch.export`` see the reference); Triton importable. Fake tensors, which
:mod:`covpool.bench.trace` uses to count the CUDA path's products and kernels without a GPU, take the
reference too: a Triton launch needs real memory. :class:`covpool.linalg.roots.MatmulRoot` asks here,
once per direction.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING

import torch
from torch._subclasses.fake_tensor import is_fake

from covpool.kernels import fused_iteration, fused_lyapunov
from covpool.numerics import is_tracing

if TYPE_CHECKING:
    from covpool.linalg.options import RootPlan

MAX_N = 64
"""Largest ``n`` dispatched to the kernels: a program holds its matrices in registers, which at tile 64
already spill a little and at tile 128 would need more shared memory than a GPU has
(:func:`covpool.kernels.fused_iteration.tile_size`). Larger ``n`` compute correctly in the interpreter
(checked at n = 100)."""


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (CPU builds of torch come without it)."""
    return importlib.util.find_spec("triton") is not None


def _eligible(A: torch.Tensor, plan: RootPlan) -> bool:
    """The conditions both directions share, in order of cost. ``A``: ``(*, n, n)``."""
    return (
        plan.fused
        and A.is_cuda
        and not is_fake(A)
        and A.dtype == torch.float32
        and A.shape[-1] <= MAX_N
        and plan.gradient == "lyapunov"
        and plan.precision == "full"
        and not is_tracing()
        and triton_available()
    )


def uses_fused_forward(A_hat: torch.Tensor, plan: RootPlan) -> bool:
    """Whether the forward iteration of ``A_hat`` (``(*, n, n)``) runs in the fused kernel."""
    return (
        _eligible(A_hat, plan)
        and plan.forward is not None
        and fused_iteration.schedule_in_kernel(plan.forward)
    )


def uses_fused_backward(Y: torch.Tensor, plan: RootPlan) -> bool:
    """Whether the Lyapunov solve with the computed root ``Y`` (``(*, n, n)``) runs in the fused kernel."""
    return _eligible(Y, plan) and fused_lyapunov.schedule_in_kernel(plan.backward)
