"""Sample covariance, upper-triangular vectorisation and square-root covariance pooling.

The covariance is formed by centring the samples and one batched matrix product, ``X̄ᵀ X̄ / M``; the
``M × M`` centring matrix ``I - 11ᵀ/M`` of the iSQRT-COV paper is never built (it costs ``O(M²)`` memory
and an extra ``O(M² d)`` product for the same result).

Upper-triangular vectorisation keeps the ``d (d + 1) / 2`` entries ``A_ij, i <= j`` in row-major order
(the order of :func:`torch.triu_indices`) and multiplies the off-diagonal entries by ``√2`` by default.
With that scaling the map is an isometry: ``‖triu(A)‖₂ = ‖A‖_F`` and ``⟨triu(A), triu(B)⟩ = ⟨A, B⟩_F``,
so a linear classifier on the vector is exactly a Frobenius inner product with a symmetric weight matrix
and each off-diagonal pair counts as much as it does in the matrix. iSQRT-COV takes the entries unscaled
(``off_diagonal_scale=1.0`` reproduces that); before a linear layer the difference is a fixed rescaling of
weights, which changes only initialisation and weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from covpool.linalg import RootOptions, sqrtm
from covpool.numerics import working_dtype

MIN_POSITIONS = 2
"""Fewest positions (samples) a covariance pooling accepts: the covariance of one position is zero."""


def output_dtype(x: Tensor) -> torch.dtype:
    """Dtype a second-order layer returns: the autocast dtype under autocast, else the input dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def covariance(x: Tensor) -> Tensor:
    """Biased sample covariance of the rows of ``x``, by centring and one batched matrix product.

    Computed in float32 (float64 inputs stay float64) with autocast disabled, whatever the input dtype.

    Args:
        x: samples in rows, ``(*, M, d)``.

    Returns:
        ``(*, d, d)`` covariance ``(x - x̄)ᵀ (x - x̄) / M`` in the working dtype.

    Shape:
        - x: :math:`(*, M, d)`
        - output: :math:`(*, d, d)`

    Example:
        >>> x = torch.randn(2, 50, 3, dtype=torch.float64)
        >>> torch.allclose(covariance(x)[0], torch.cov(x[0].T, correction=0))
        True
    """
    if x.ndim < 2:
        raise ValueError(f"x must have shape (*, M, d), at least 2 dimensions, got shape {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(working_dtype(x.dtype))
        centred = x - x.mean(dim=-2, keepdim=True)
        return centred.mT @ centred / x.shape[-2]


def triu_vectorize(A: Tensor, *, off_diagonal_scale: float = math.sqrt(2.0)) -> Tensor:
    """Upper triangle (diagonal included) of symmetric ``A`` as a vector, off-diagonals scaled.

    The default ``√2`` makes the map an isometry, ``‖triu_vectorize(A)‖₂ = ‖A‖_F`` (see the module
    docstring); ``off_diagonal_scale=1.0`` gives the plain entries as in iSQRT-COV.

    Shape:
        - A: :math:`(*, d, d)`
        - output: :math:`(*, d (d + 1) / 2)`, entries in the order of ``torch.triu_indices(d, d)``

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [2.0, 3.0]])
        >>> triu_vectorize(A, off_diagonal_scale=1.0)
        tensor([1., 2., 3.])
    """
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape (*, d, d), got shape {tuple(A.shape)}")
    d = A.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=A.device)
    scale = torch.where(rows == cols, 1.0, off_diagonal_scale).to(A.dtype)
    return A[..., rows, cols] * scale


def sqrt_covariance_pool(
    tokens: Tensor,
    *,
    root: RootOptions | str | dict | None = None,
    eps: float = 1e-4,
    off_diagonal_scale: float = math.sqrt(2.0),
) -> Tensor:
    """Matrix-power-normalised covariance pooling (iSQRT-COV): ``triu(Σ^(1/2))`` of each sample's tokens.

    The covariance and its root run in float32 (float64 stays float64) with autocast disabled; the
    result is returned in the autocast dtype under autocast, else in the input dtype. Each sample is
    pooled at unit scale and scaled back (:func:`sample_scale`), so features of any magnitude the dtype
    holds (1e-20 and 1e20 in float32 alike) give the exact root, not an overflow or a flush to zero.

    Args:
        tokens: ``(N, M, d)`` features of ``M >= 2`` positions per sample (the covariance of one position
            is zero, so its pooled vector would not depend on the input: ``M = 1`` raises).
        root: options of :func:`covpool.sqrtm` (a :class:`covpool.RootOptions`, a method name or a dict).
        eps: *relative* ridge passed to :func:`covpool.sqrtm` (``Σ + eps (tr Σ / d) I``). When ``M <= d``
            the covariance is singular (rank at most ``M - 1``) and the root's gradient grows like
            ``1 / √λ`` at the zero eigenvalues; the ridge bounds it by ``1 / √(eps tr Σ / d)``.
        off_diagonal_scale: see :func:`triu_vectorize`.

    Shape:
        - tokens: :math:`(N, M, d)`
        - output: :math:`(N, d (d + 1) / 2)`

    Example:
        >>> sqrt_covariance_pool(torch.randn(4, 49, 8)).shape
        torch.Size([4, 36])
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (N, M, d), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] < MIN_POSITIONS:
        raise ValueError(
            f"tokens must hold at least {MIN_POSITIONS} positions per sample (N, M >= {MIN_POSITIONS}, d): "
            f"the covariance of one position is zero, so the pooled vector would be the same for every "
            f"input; got shape {tuple(tokens.shape)}"
        )
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        x = tokens.to(working_dtype(tokens.dtype))
        scale = sample_scale(x)
        pooled = sqrtm(covariance(x / scale), root, eps=eps) * scale
    return triu_vectorize(pooled, off_diagonal_scale=off_diagonal_scale).to(output_dtype(tokens))


def sample_scale(x: Tensor) -> Tensor:
    """Largest ``|x|`` of each sample of ``(N, M, d)`` tokens, detached, shape ``(N, 1, 1)``; 1 where that
    is 0 or not finite (the root then answers the non-finite values itself).

    ``Σ(x)^(1/2) = s Σ(x / s)^(1/2)`` for any ``s > 0``: pooling ``x / s`` and scaling back gives the same
    vector without forming squares that overflow (``|x| > 1.8e19`` in float32) or underflow into
    subnormals (``|x| < 1.1e-19``). With ``s`` detached the gradient is the same function's, since the
    root is homogeneous of degree 1 in ``x``.

    Example:
        >>> sample_scale(torch.tensor([[[1.0, -3.0]], [[0.0, 0.0]]])).flatten()
        tensor([3., 1.])
    """
    scale = x.detach().abs().amax(dim=(-2, -1), keepdim=True)
    return torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
