"""Spectral scale estimates used to normalise ``A`` before a series or an iteration.

The series and iterations in :mod:`covpool.linalg.iteration` converge on the normalised eigenvalues
``x = λ / c``; they converge slowly where ``x`` is small, so ``c`` should be as close to ``λmax`` as is
safe. Three estimates are offered:

- ``"frobenius"``: ``c = ‖A‖_F`` (the paper's choice). Always ``≥ λmax``, but up to ``√n`` times too large
  when the spectrum is flat, which pushes every ``x`` towards 0.
- ``"power"`` (default): a Rayleigh quotient after a few power iterations, clamped to
  ``[‖A‖_F / √n, ‖A‖_F]``. It approaches ``λmax`` from below; the iterations downstream converge for
  ``x`` somewhat above 1, so the slight underestimate costs nothing, while the tighter scale raises the
  small normalised eigenvalues by up to ``√n``.
- ``"trace"``: ``c = tr(A)`` (iSQRT-COV's choice), the loosest of the three.

Every estimate first divides ``A`` by its largest absolute entry, so that matrices scaled anywhere from
1e-30 to 1e30 neither overflow nor underflow in the squares the norms take.
"""

from __future__ import annotations

import math

import torch

NORMALIZATIONS = ("power", "frobenius", "trace")


def _one_if_zero(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero matrix has no scale of its own; it is given 1, so that it stays zero after division."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def max_abs_scale(A: torch.Tensor) -> torch.Tensor:
    """Largest absolute entry per matrix (1 for an all-zero matrix). Shape: ``(*, n, n)`` → ``(*, 1, 1)``."""
    return _one_if_zero(A.abs().amax(dim=(-2, -1), keepdim=True))


def _start_vector(n: int, like: torch.Tensor) -> torch.Tensor:
    """Deterministic, irregular start vector (a hash of the index) for the power iteration.

    Being built from tensor ops alone, it traces under ``torch.compile`` and ``torch.export``. Its
    entries are spread over ``[0.5, 1.5)``, so it is never orthogonal to a structured eigenvector such
    as one whose entries sum to zero.
    """
    index = torch.arange(1, n + 1, dtype=like.dtype, device=like.device)
    hashed = torch.frac(torch.sin(index * 12.9898) * 43758.5453)
    return (hashed + 0.5).unsqueeze(-1)


def spectral_scale(A: torch.Tensor, normalization: str = "power", *, power_iters: int = 8) -> torch.Tensor:
    """Estimate of ``λmax(A)`` for symmetric PSD ``A``, used as the normalising constant ``c``.

    Args:
        A: ``(*, n, n)`` symmetric positive semi-definite matrices.
        normalization: ``"power"``, ``"frobenius"`` or ``"trace"`` (see the module docstring).
        power_iters: power iterations for ``"power"``; each costs one batched matrix-vector product.

    Returns:
        ``(*, 1, 1)`` positive scale, never zero (an all-zero matrix gets 1).
    """
    tiny = torch.finfo(A.dtype).tiny
    prescale = max_abs_scale(A)
    B = A / prescale
    if normalization == "trace":
        estimate = B.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    else:
        estimate = torch.linalg.matrix_norm(B, keepdim=True)
        if normalization == "power":
            v = _start_vector(A.shape[-1], B).expand(*B.shape[:-1], 1)
            for _ in range(power_iters):
                v = B @ v
                v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
            rayleigh = v.mT @ B @ v
            estimate = torch.clamp(rayleigh, min=estimate / math.sqrt(A.shape[-1]), max=estimate)
    return _one_if_zero(estimate * prescale)
