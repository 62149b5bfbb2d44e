"""Fused Triton kernels of the roots, each beside the plain-torch reference it must match.

Triton is optional: nothing here imports it until a kernel is launched. Where a kernel runs is decided by
the planner (:func:`covpool.linalg.planner.plan_root`), which imports this package only for a call that
asks for ``fused=True``; nothing here imports the root API.
"""

from __future__ import annotations

import functools
import importlib.util

MAX_N = 64
"""Largest ``n`` the planner sends to the kernels: up to tile 64 no kernel spills on sm_80, sm_90 or sm_100
(``python -m covpool.kernels.aot``, asserted by ``tests/test_kernels_aot.py``). At tile 128 the products
would fit, but a Padé step's Cholesky factorisation holds two 64 KB tiles in registers, and the kernels
spill there (docs/precision-gpu.md, "Fused Triton kernels"). Larger ``n`` compute correctly in the
interpreter."""


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (CPU builds of torch come without it)."""
    return importlib.util.find_spec("triton") is not None
