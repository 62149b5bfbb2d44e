"""Rules of ``method="auto"``: the fastest method that meets the tolerance, per device, dtype and size.

The rules come from ``python -m covpool.bench`` on SPD matrices with condition numbers up to 1e3:

- CPU (2 cores, float32, batch 64, forward+backward): the exact ``"eigh"`` path with the
  Daleckii-Krein backward is the fastest method at every size measured (n = 32 … 512), ahead of
  ``torch.linalg.matrix_sqrth`` and of every matmul method, so it is chosen whatever the tolerance.
- CUDA: batched eigendecomposition is slow on GPUs while matrix products are fast, so the coupled Taylor
  iteration ``"mtp"`` (matrix products only, no solve; relative error about 1e-6 in float32 at
  condition 1e3) is chosen when the tolerance allows it. This rule is not yet backed by a GPU
  measurement in this repository; the README names the prepared command that produces one.
- Tolerances below what float32 matrix products reach (1e-5) fall back to ``"eigh"``.
"""

from __future__ import annotations

import torch

MATMUL_TOLERANCE = 1e-5
"""Smallest relative error the matmul methods are relied on to reach (float32, condition 1e3)."""


def choose_method(device: torch.device, tol: float) -> str:
    """Method for inputs on ``device`` with target relative error ``tol`` (any size and dtype so far)."""
    if device.type == "cpu" or tol < MATMUL_TOLERANCE:
        return "eigh"
    return "mtp"
