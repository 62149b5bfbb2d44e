"""Fused Triton kernels of the roots, each beside the plain-torch reference it must match.

Triton is optional: nothing here imports it until a kernel is launched. Where a kernel runs is decided by
the planner (:func:`covpool.linalg.planner.plan_root`), which imports this package only for a call that
asks for ``fused=True``; nothing here imports the root API.
"""

from __future__ import annotations

import functools
import importlib.util

MAX_N = 64
"""Largest ``n`` the planner sends to the kernels: a program holds its matrices in registers, which at tile
64 already spill a little and at tile 128 would need more shared memory than a GPU has
(:func:`covpool.kernels.fused_iteration.tile_size`). Larger ``n`` compute correctly in the interpreter
(checked at n = 100)."""


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (CPU builds of torch come without it)."""
    return importlib.util.find_spec("triton") is not None
