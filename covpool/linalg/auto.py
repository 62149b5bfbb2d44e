"""Rules of ``method="auto"``: the fastest method that meets the tolerance, per device, size and batch.

The rules come from ``python -m covpool.bench`` on SPD matrices with condition number 1e3 (figures in the
README), forward+backward, float32:

- CPU (2 cores; n = 32 … 256, batch 1 … 64): the exact ``"eigh"`` path with the Daleckii-Krein backward
  is the fastest method at every size measured, ahead of ``torch.linalg.matrix_sqrth`` and of every
  matmul method, so it is chosen whatever the tolerance.
- CUDA (H200; n = 32 … 512, batch 1 … 256): ``"eigh"`` wins for n <= 32 (cuSOLVER's batched Jacobi
  kernel; 1.4 ms against 7 ms for ``"mtp"``) and for a single matrix up to n = 256 (7.7 ms against
  8.7 ms), because the matmul methods are bound by kernel launches there. Everywhere else the coupled
  Taylor iteration ``"mtp"`` (matrix products only, relative error about 3e-6) wins, by 36x at n = 256,
  batch 64 (9.9 ms against 358 ms).
- Tolerances below what float32 matrix products reach (1e-5) fall back to ``"eigh"``.
"""

from __future__ import annotations

import torch

MATMUL_TOLERANCE = 1e-5
"""Smallest relative error the matmul methods are relied on to reach (float32, condition 1e3)."""
_CUDA_EIGH_MAX_N = 32
_CUDA_SINGLE_MATRIX_EIGH_MAX_N = 256


def choose_method(device: torch.device, tol: float, n: int, num_matrices: int) -> str:
    """Method for ``num_matrices`` matrices of size ``n × n`` on ``device`` with relative error ``tol``."""
    if device.type != "cuda" or tol < MATMUL_TOLERANCE or n <= _CUDA_EIGH_MAX_N:
        return "eigh"
    if num_matrices == 1 and n <= _CUDA_SINGLE_MATRIX_EIGH_MAX_N:
        return "eigh"
    return "mtp"
