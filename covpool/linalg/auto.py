"""Rules of ``method="auto"``, from ``python -m covpool.bench`` (figures in the README).

- **CPU** (2 cores, n = 32 … 256, batch 1 … 64): the exact ``"eigh"`` path with its Daleckii-Krein
  backward is the fastest method at every size measured, ahead of ``torch.linalg.matrix_sqrth`` and of
  every matmul method (a CPU matrix product is not launch-bound, and LAPACK's eigensolver is fast), so it is
  chosen whatever the tolerance.
- **CUDA**: ``"mtp"``, the certified minimax-polynomial iteration: matrix products only, no host
  synchronisation (``torch.linalg.eigh`` synchronises to check its result, and batched eigensolvers are
  slow on GPUs). Below the accuracy float32 products reach (``tol < 1e-5``), and wherever mtp's plan
  refuses ``tol`` (:meth:`covpool.RootOptions.plan`: float32 at ``tol=1e-5`` and n = 512, say), ``"eigh"``.
- **While tracing** (``torch.compile``, ``torch.export``): ``"mtp"``, whose graph is matrix products only,
  so that it exports to ONNX and is captured in CUDA graphs.
"""

from __future__ import annotations

import torch

MATMUL_FLOOR = {torch.float64: 1e-12}
"""Smallest relative error the matmul methods are relied on for, per working dtype (default 1e-5)."""


def choose_method(device_type: str, tol: float, dtype: torch.dtype, tracing: bool) -> str:
    """Method for ``method="auto"`` on a device of ``device_type`` at tolerance ``tol``."""
    if tracing:
        return "mtp"
    if device_type != "cuda":
        return "eigh"
    floor = MATMUL_FLOOR.get(dtype, 1e-5)
    return "eigh" if tol < floor else "mtp"
