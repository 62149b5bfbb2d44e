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

Working precision: a float32 eigendecomposition is off by about ``u κ`` in the root and its gradient
(``u`` float32's machine epsilon; :data:`FLOAT32_GROWTH`). ``method="eigh"`` decomposes float32 input, and
forms its gradient, in float64 (:data:`DECOMPOSED_IN`), which holds every κ float32 can represent. Given a
``tol`` (``method="auto"`` on CPU), each float32 matrix is decomposed in float32 first, and only the matrices
whose own eigenvalues give ``FLOAT32_GROWTH · u · κ > tol`` (or that are not positive definite within
float32) are decomposed again in float64; reading the eigenvalues on the host costs no synchronisation on
CPU. The validity test and the floor stay at the input's rounding level, which is what decides whether a
float32 matrix is PSD.
"""

from __future__ import annotations

import torch

from covpool.checks import reads_values, refuse_double_backward
from covpool.linalg.precision import products_in
from covpool.numerics import eye_like

_RELATIVE_ROUNDING = 10.0
DECOMPOSED_IN = {torch.float32: torch.float64}
"""The dtype the decomposition and the gradient's products run in, per input dtype (else its own)."""
FLOAT32_GROWTH = 5.0
"""Bound on the relative error of a float32 decomposition's root and gradient, in ``u κ``: the largest
measured is 2.5 (inverse root's gradient, κ = 1e5, n = 128) and this leaves 2× room. Measured by
``python examples/studies/eigh_precision.py``, recorded in ``examples/results/eigh_precision.json``."""


class EighRoot(torch.autograd.Function):
    """``sym(A)^p`` for ``p = ±1/2`` by ``torch.linalg.eigh``, exact gradient by Daleckii-Krein.

    Returns the root and a per-matrix validity flag (``(*,)`` bool, not differentiable).
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx, A: torch.Tensor, inverse: bool, precision: str, tol: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_dtype, unit_roundoff = A.dtype, torch.finfo(A.dtype).eps
        if tol is None or A.dtype not in DECOMPOSED_IN:
            A = A.to(DECOMPOSED_IN.get(A.dtype, A.dtype))
        magnitude = A.abs().amax(dim=(-2, -1), keepdim=True)  # NaN or inf where A holds NaN or ±inf
        finite = torch.isfinite(magnitude)
        scale = torch.where(finite & (magnitude > 0), magnitude, torch.ones_like(magnitude))
        # LAPACK refuses NaN/Inf: such a matrix is swapped for the identity and marked invalid below (where
        # reading the flags is free, only when there is one)
        normalised = A / scale
        if not reads_values(None, A.device) or not bool(finite.all()):
            normalised = torch.where(finite, normalised, eye_like(A))
        eigenvalues, vectors = torch.linalg.eigh(normalised)
        if tol is not None and A.dtype in DECOMPOSED_IN:
            eigenvalues, vectors, scale = _redecompose(A, scale, eigenvalues, vectors, tol)
        top = eigenvalues[..., -1:].clamp_min(0)
        rounding = _RELATIVE_ROUNDING * A.shape[-1] * unit_roundoff * top
        smallest = eigenvalues[..., 0]
        valid = finite[..., 0, 0] & (smallest >= -rounding[..., 0])
        if inverse:
            valid = valid & (top[..., 0] > 0)
        # The backward's kernel only needs positive eigenvalues: floor at machine precision, not at the
        # (larger) rounding level of the validity test, which would change the gradient of a ridged matrix.
        floor = (unit_roundoff * top).clamp_min(torch.finfo(input_dtype).tiny)
        floored = torch.maximum(eigenvalues, floor).sqrt()
        values = floored.reciprocal() if inverse else eigenvalues.clamp_min(0).sqrt()
        # the scale and the NaN of an invalid matrix ride on the eigenvalues: no pass over the n × n result
        factor = torch.where(valid[..., None, None], scale.rsqrt() if inverse else scale.sqrt(), float("nan"))
        out = ((vectors * (values.unsqueeze(-2) * factor)) @ vectors.mT).to(input_dtype)
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
    def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        roots, vectors, scale = ctx.saved_tensors
        factor = scale.pow(-1.5) if ctx.inverse else scale.rsqrt()
        grad_A = _daleckii_krein(roots, vectors, grad.to(vectors.dtype), inverse=ctx.inverse, factor=factor)
        return grad_A.to(grad.dtype), None, None, None


def _redecompose(
    A: torch.Tensor, scale: torch.Tensor, eigenvalues: torch.Tensor, vectors: torch.Tensor, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 decomposition (``eigenvalues`` ``(*, n)``, ``vectors`` ``(*, n, n)``) of ``A / scale``
    (``(*, n, n)`` and ``(*, 1, 1)``) where its own eigenvalues certify ``tol`` for every matrix
    (:data:`FLOAT32_GROWTH`); else the batch in float64, the matrices that need it decomposed again in
    float64. Reads one flag on the host (free on CPU)."""
    unit_roundoff = torch.finfo(A.dtype).eps
    top, smallest = eigenvalues[..., -1], eigenvalues[..., 0]
    certified = FLOAT32_GROWTH * unit_roundoff * top < tol * smallest  # also false where smallest <= 0
    if bool(certified.all()):
        return eigenvalues, vectors, scale
    wide = DECOMPOSED_IN[A.dtype]
    n = A.shape[-1]
    redo = (~certified).reshape(-1)
    scale = scale.to(wide)  # the largest entry, exact in either dtype
    eigenvalues, vectors = eigenvalues.to(wide).reshape(-1, n), vectors.to(wide).reshape(-1, n, n)
    chosen = A.reshape(-1, n, n)[redo].to(wide) / scale.reshape(-1, 1, 1)[redo]
    eigenvalues[redo], vectors[redo] = torch.linalg.eigh(chosen)
    return eigenvalues.reshape(A.shape[:-1]), vectors.reshape(A.shape), scale


def _daleckii_krein(
    roots: torch.Tensor,
    vectors: torch.Tensor,
    grad: torch.Tensor,
    *,
    inverse: bool,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """``U (K ∘ (Uᵀ sym(G) U)) Uᵀ`` with the kernel ``K`` of the module docstring, from the square roots
    of the eigenvalues (``(*, n)``, positive) and the eigenvectors ``U`` (``(*, n, n)``); ``G``:
    ``(*, n, n)``. ``factor`` (``(*, 1, 1)``), where given, multiplies the result (it is folded into the
    kernel, as is the ``1/2`` of ``sym``)."""
    pair_sum = roots.unsqueeze(-1) + roots.unsqueeze(-2)
    numerator = 0.5 if factor is None else 0.5 * factor
    if inverse:
        kernel = -numerator / (roots.unsqueeze(-1) * roots.unsqueeze(-2) * pair_sum)
    else:
        kernel = numerator / pair_sum
    inner = vectors.mT @ (grad + grad.mT) @ vectors
    return vectors @ (kernel * inner) @ vectors.mT


def exact_root_gradient(A: torch.Tensor, grad: torch.Tensor, *, inverse: bool) -> torch.Tensor:
    """``∂L/∂A`` of ``L`` through ``A^(±1/2)`` for symmetric positive definite ``A``, by the Daleckii-Krein
    formula in ``A``'s dtype (no autograd). ``grad`` is ``∂L/∂A^(±1/2)``; only its symmetric part
    matters. Shapes: ``(*, n, n)`` each."""
    eigenvalues, vectors = torch.linalg.eigh(A)
    roots = eigenvalues.clamp_min(torch.finfo(A.dtype).tiny).sqrt()
    return _daleckii_krein(roots, vectors, grad, inverse=inverse)


def eigh_root(
    A: torch.Tensor, *, inverse: bool, precision: str, tol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A^(±1/2), valid)`` of symmetric ``A`` of shape ``(*, n, n)``; ``valid`` has shape ``(*,)``. The
    backward's products run at ``precision`` (:mod:`covpool.linalg.precision`); the caller scopes the
    forward's. ``tol``: decompose float32 matrices in float32 where that holds ``tol`` (module docstring);
    None: in float64, exact at every κ."""
    return EighRoot.apply(A, inverse, precision, tol)
