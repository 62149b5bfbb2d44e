"""Exact matrix roots by eigendecomposition, with the Daleckii-Krein backward.

Forward: ``A = U diag(λ) Uᵀ`` and ``f(A) = U diag(f(λ)) Uᵀ`` with ``f(λ) = λ^p``, ``p = ±1/2``.
Backward: ``∂L/∂A = U (K ∘ (Uᵀ sym(G) U)) Uᵀ`` with the divided differences of ``f`` written in a form
that never divides by ``λi - λj``:

- ``p = +1/2``: ``K_ij = 1 / (√λi + √λj)``
- ``p = -1/2``: ``K_ij = -1 / (√λi √λj (√λi + √λj))``

so repeated eigenvalues (where autograd through ``torch.linalg.eigh`` returns NaN or Inf) are exact.
The matrix is divided by its largest absolute entry before the decomposition, which keeps inputs
scaled anywhere from 1e-30 to 1e30 inside the floating range. Eigenvalues are floored at the dtype's
machine epsilon times that scale, so singular and all-zero matrices give finite roots and gradients.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from covpool.linalg.normalization import max_abs_scale


def _root_eigenvalues(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(sqrt_eigenvalues, eigenvectors, scale)`` of ``A / scale``, eigenvalues floored.

    Shapes: ``A (*, n, n)`` → ``(*, n)``, ``(*, n, n)``, ``(*, 1, 1)``.
    """
    scale = max_abs_scale(A)
    eigenvalues, eigenvectors = torch.linalg.eigh(A / scale)
    # After division by the largest entry, λmax >= 1 for any non-zero PSD matrix, so this floor is relative.
    eigenvalues = eigenvalues.clamp_min(torch.finfo(A.dtype).eps)
    return eigenvalues.sqrt(), eigenvectors, scale


class EighRoot(torch.autograd.Function):
    """``sym(A)^p`` for ``p = ±1/2`` by ``torch.linalg.eigh``, exact gradient by Daleckii-Krein."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, inverse: bool) -> torch.Tensor:  # noqa: D102
        roots, vectors, scale = _root_eigenvalues(A)
        values = roots.reciprocal() if inverse else roots
        out = (vectors * values.unsqueeze(-2)) @ vectors.mT
        ctx.save_for_backward(roots, vectors, scale)
        ctx.inverse = inverse
        return out * (scale.rsqrt() if inverse else scale.sqrt())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        roots, vectors, scale = ctx.saved_tensors
        pair_sum = roots.unsqueeze(-1) + roots.unsqueeze(-2)
        if ctx.inverse:
            kernel = -1.0 / (roots.unsqueeze(-1) * roots.unsqueeze(-2) * pair_sum)
            factor = scale.pow(-1.5)
        else:
            kernel = 1.0 / pair_sum
            factor = scale.rsqrt()
        grad_sym = 0.5 * (grad + grad.mT)
        inner = vectors.mT @ grad_sym @ vectors
        grad_A = vectors @ (kernel * inner) @ vectors.mT
        return grad_A * factor, None


def eigh_root(A: torch.Tensor, *, inverse: bool) -> torch.Tensor:
    """``A^(1/2)`` or ``A^(-1/2)`` of symmetric PSD ``A`` of shape ``(*, n, n)`` by eigendecomposition."""
    return EighRoot.apply(A, inverse)
