"""Rules of ``method="auto"``: the fastest method that meets the tolerance, per device, dtype and size."""

from __future__ import annotations

import torch


def choose_method(n: int, device: torch.device, dtype: torch.dtype, tol: float) -> str:
    """Method for ``(*, n, n)`` inputs of ``dtype`` on ``device`` with target relative error ``tol``."""
    if device.type == "cpu":
        return "eigh"
    return "mtp"
