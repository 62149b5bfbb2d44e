"""Exact matrix roots by eigendecomposition, with the Daleckii-Krein backward.

Forward: ``A = U diag(λ) Uᵀ`` and ``f(A) = U diag(f(λ)) Uᵀ`` with ``f(λ) = λ^p``, ``p = ±1/2``.
Backward: ``∂L/∂A = U (K ∘ (Uᵀ sym(G) U)) Uᵀ`` with the divided differences of ``f`` written in a form
that never divides by ``λi - λj``:

- ``p = +1/2``: ``K_ij = 1 / (√λi + √λj)``
- ``p = -1/2``: ``K_ij = -1 / (√λi √λj (√λi + √λj))``

so repeated eigenvalues (where autograd through ``torch.linalg.eigh`` returns NaN or Inf) are exact.
The matrix is divided by its largest absolute entry before the decomposition, which keeps inputs
scaled anywhere from 1e-30 to 1e30 inside the floating range.

Validity: eigenvalues down to ``-δ λmax`` with ``δ = 10 n ε`` (``ε`` the dtype's machine epsilon) are
rounding and count as zero; below that the matrix is not PSD. The square root of a PSD matrix takes
``√max(λ, 0)``, so a singular or all-zero matrix has its exact root; only the backward's kernel uses
eigenvalues floored at ``ε λmax``, which keeps the gradient finite where the exact one is infinite. The
inverse root of a matrix that is singular within rounding uses the same floor (the inverse root of the
matrix with its eigenvalues raised to ``ε λmax``); an all-zero matrix has none. An invalid matrix gets NaN.

Working precision: float32 input is decomposed, and its gradient formed, in float64 (:data:`DECOMPOSED_IN`).
A float32 eigendecomposition is off by about ``u κ`` (measured: gradients 2 % off at κ = 1e6, 0.2 % at
κ = 1e4, where the plans' ``tol`` is 1e-3), so the exact path would be silently wrong beyond κ ≈ 1e4; in
float64 it holds every κ float32 can represent, at 1.4× (n = 64) to 2.0× (n = 256) the CPU cost of a
float32 decomposition (README). The validity test and the floor stay at the input's rounding level,
which is what decides whether a float32 matrix is PSD.
"""

from __future__ import annotations

import torch

from covpool.checks import refuse_double_backward
from covpool.linalg.precision import products_in
from covpool.numerics import eye_like

_RELATIVE_ROUNDING = 10.0
DECOMPOSED_IN = {torch.float32: torch.float64}
"""The dtype the decomposition and the gradient's products run in, per input dtype (else its own)."""


def _max_abs(A: torch.Tensor) -> torch.Tensor:
    scale = A.abs().amax(dim=(-2, -1), keepdim=True)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class EighRoot(torch.autograd.Function):
    """``sym(A)^p`` for ``p = ±1/2`` by ``torch.linalg.eigh``, exact gradient by Daleckii-Krein.

    Returns the root and a per-matrix validity flag (``(*,)`` bool, not differentiable).
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx, A: torch.Tensor, inverse: bool, precision: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # LAPACK refuses NaN/Inf; such a matrix is swapped for the identity and marked invalid below.
        finite = torch.isfinite(A).flatten(-2).all(-1)
        input_dtype, unit_roundoff = A.dtype, torch.finfo(A.dtype).eps
        A = torch.where(finite[..., None, None], A, eye_like(A)).to(DECOMPOSED_IN.get(A.dtype, A.dtype))
        scale = _max_abs(A)
        eigenvalues, vectors = torch.linalg.eigh(A / scale)
        top = eigenvalues[..., -1:].clamp_min(0)
        rounding = _RELATIVE_ROUNDING * A.shape[-1] * unit_roundoff * top
        smallest = eigenvalues[..., 0]
        valid = finite & (smallest >= -rounding[..., 0])
        if inverse:
            valid = valid & (top[..., 0] > 0)
        # The backward's kernel only needs positive eigenvalues: floor at machine precision, not at the
        # (larger) rounding level of the validity test, which would change the gradient of a ridged matrix.
        floor = (unit_roundoff * top).clamp_min(torch.finfo(input_dtype).tiny)
        floored = torch.maximum(eigenvalues, floor).sqrt()
        values = floored.reciprocal() if inverse else eigenvalues.clamp_min(0).sqrt()
        out = (vectors * values.unsqueeze(-2)) @ vectors.mT
        out = out * (scale.rsqrt() if inverse else scale.sqrt())
        out = torch.where(valid[..., None, None], out, torch.full_like(out, float("nan"))).to(input_dtype)
        ctx.save_for_backward(floored, vectors, scale)
        ctx.inverse = inverse
        ctx.precision = precision
        ctx.mark_non_differentiable(valid)
        return out, valid

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _valid_grad: torch.Tensor):  # noqa: D102
        refuse_double_backward("eigh")
        with products_in(ctx.precision, grad.dtype):
            return EighRoot._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        roots, vectors, scale = ctx.saved_tensors
        factor = scale.pow(-1.5) if ctx.inverse else scale.rsqrt()
        grad_A = _daleckii_krein(roots, vectors, grad.to(vectors.dtype), inverse=ctx.inverse)
        return (grad_A * factor).to(grad.dtype), None, None


def _daleckii_krein(
    roots: torch.Tensor, vectors: torch.Tensor, grad: torch.Tensor, *, inverse: bool
) -> torch.Tensor:
    """``U (K ∘ (Uᵀ sym(G) U)) Uᵀ`` with the kernel ``K`` of the module docstring, from the square roots
    of the eigenvalues (``(*, n)``, positive) and the eigenvectors ``U`` (``(*, n, n)``); ``G``:
    ``(*, n, n)``."""
    pair_sum = roots.unsqueeze(-1) + roots.unsqueeze(-2)
    kernel = -1.0 / (roots.unsqueeze(-1) * roots.unsqueeze(-2) * pair_sum) if inverse else 1.0 / pair_sum
    inner = vectors.mT @ (0.5 * (grad + grad.mT)) @ vectors
    return vectors @ (kernel * inner) @ vectors.mT


def exact_root_gradient(A: torch.Tensor, grad: torch.Tensor, *, inverse: bool) -> torch.Tensor:
    """``∂L/∂A`` of ``L`` through ``A^(±1/2)`` for symmetric positive definite ``A``, by the Daleckii-Krein
    formula in ``A``'s dtype (no autograd). ``grad`` is ``∂L/∂A^(±1/2)``; only its symmetric part
    matters. Shapes: ``(*, n, n)`` each."""
    eigenvalues, vectors = torch.linalg.eigh(A)
    roots = eigenvalues.clamp_min(torch.finfo(A.dtype).tiny).sqrt()
    return _daleckii_krein(roots, vectors, grad, inverse=inverse)


def eigh_root(A: torch.Tensor, *, inverse: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A^(±1/2), valid)`` of symmetric ``A`` of shape ``(*, n, n)``; ``valid`` has shape ``(*,)``. The
    backward's products run at ``precision`` (:mod:`covpool.linalg.precision`); the caller scopes the
    forward's."""
    return EighRoot.apply(A, inverse, precision)
