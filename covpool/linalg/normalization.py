"""Scaling of ``A`` before an iteration: ``Â = A / c`` with ``c >= λmax(A)``, so the spectrum of ``Â`` lies in
``(0, 1]``, and a known bound ``c / λmax <= n^slack`` lets :mod:`covpool.linalg.options` certify schedules.

- ``"schatten8"`` (default of mtp and mpa without a ridge): ``c = (tr A⁸)^(1/8) = ‖A⁴‖_F^(1/4)``, the
  Schatten-8 norm. Always ``>= λmax`` and at most ``rank^(1/8) λmax`` (1.7× at n = 64, 2× at n = 256), for
  two matrix products. (The power iteration gives ``λmax`` more tightly but from below, so no spectrum
  bound holds.)
- ``"frobenius"`` (the paper's): ``c = ‖A‖_F``, within ``√rank`` of ``λmax``; no products.
- ``"trace"`` (iSQRT-COV's, the default of ns, and of mtp and mpa with a ridge): ``c = tr A``, within
  ``rank``. A relative ridge ``eps (tr A / n) I`` bounds ``λmin / c`` below by ``eps / (n (1 + eps))``
  for every ``c`` here, since each is at most the trace: where the ridge sets the bound, the trace
  certifies as much as the Schatten-8 norm and costs nothing, but a rank-deficient input then sits
  exactly on the bound, so the plan leaves room below it for the rounding of the input
  (:mod:`covpool.linalg.options`).

``A`` is first divided by ``tr A``, which bounds every entry of a PSD matrix, so that inputs scaled
anywhere from 1e-30 to 1e30 neither overflow nor underflow in the powers. Scales are floored at the
smallest normal number, so an all-zero matrix stays zero (and has a tiny, positive scale), and a matrix
with a negative trace, which is not PSD, overflows to Inf/NaN and fails the validity test downstream.
"""

from __future__ import annotations

import torch


def trace(A: torch.Tensor) -> torch.Tensor:
    """``tr A`` per matrix. Shape: ``(*, n, n)`` → ``(*, 1, 1)``."""
    return A.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]


def normalise(A: torch.Tensor, normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Â, c)`` with ``Â = A / c`` and ``c >= λmax(A)`` for symmetric PSD ``A``.

    Args:
        A: ``(*, n, n)`` symmetric matrices.
        normalization: ``"schatten8"``, ``"frobenius"`` or ``"trace"``.

    Returns:
        ``Â`` of shape ``(*, n, n)`` and ``c`` of shape ``(*, 1, 1)``, positive.
    """
    tiny = torch.finfo(A.dtype).tiny
    prescale = trace(A).clamp_min(tiny)
    A1 = A / prescale
    if normalization == "trace":
        return A1, prescale
    if normalization == "frobenius":
        norm = torch.linalg.matrix_norm(A1, keepdim=True).clamp_min(tiny)
    else:
        A2 = A1 @ A1
        norm = torch.linalg.matrix_norm(A2 @ A2, keepdim=True).clamp_min(tiny).pow(0.25)
    return A1 / norm, prescale * norm
