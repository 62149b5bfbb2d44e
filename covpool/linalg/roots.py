"""Public matrix-root functions: :func:`sqrtm` and :func:`inv_sqrtm`."""

from __future__ import annotations

import torch

from covpool.linalg.checks import check_choice, check_square_batch
from covpool.linalg.eigh import eigh_root

METHODS = ("auto", "mpa", "mtp", "ns", "eigh")


def _root(A: torch.Tensor, *, inverse: bool, method: str, eps: float, check_input: bool) -> torch.Tensor:
    if check_input:
        check_square_batch(A)
        check_choice(method, "method", METHODS)
    work_dtype = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
    with torch.autocast(device_type=A.device.type, enabled=False):
        A = A.to(work_dtype)
        A = 0.5 * (A + A.mT)
        out = eigh_root(A, inverse=inverse, eps=eps)
    return out.to(A.dtype)


def sqrtm(A: torch.Tensor, *, method: str = "auto", eps: float = 0.0, check_input: bool = True) -> torch.Tensor:
    """Principal square root of symmetric PSD ``A`` of shape ``(*, n, n)`` (work in progress)."""
    return _root(A, inverse=False, method=method, eps=eps, check_input=check_input)


def inv_sqrtm(A: torch.Tensor, *, method: str = "auto", eps: float = 0.0, check_input: bool = True) -> torch.Tensor:
    """Inverse principal square root of symmetric PD ``A`` of shape ``(*, n, n)`` (work in progress)."""
    return _root(A, inverse=True, method=method, eps=eps, check_input=check_input)
