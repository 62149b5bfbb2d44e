"""Group ZCA whitening from sufficient statistics.

The channels are split into ``G = C / g`` groups of ``g`` consecutive channels and each group is
whitened by its own ``Σ^(-1/2)``. The pieces follow the data flow of a (possibly synchronised) layer:

1. :func:`group_statistics` — per-rank sufficient statistics ``(count, Σx, Σxxᵀ)`` in float64;
2. (optionally :func:`covpool.functional.all_reduce_sum` across ranks — they are plain sums);
3. :func:`moments_from_statistics` — mean and biased covariance;
4. :func:`whitening_matrix` — ``(Σ + eps I)^(-1/2)`` by :func:`covpool.inv_sqrtm`;
5. :func:`group_whiten` — ``(x - μ) W`` per group.

Precision: the local second moment is taken about the local mean in the working dtype,
``Σxxᵀ = (x - x̄)ᵀ(x - x̄) + n x̄ x̄ᵀ``, and only then promoted to float64, so that summing over ranks
and subtracting ``N μ μᵀ`` again loses only float64 digits, never float32 ones, however large the
mean is next to the spread.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from covpool.linalg import RootOptions, inv_sqrtm
from covpool.numerics import working_dtype

STATISTICS_DTYPE = torch.float64
RELATIVE_FLOOR_ULPS = 1.0
"""The whitening's relative ridge, in machine epsilons of the working dtype (see :func:`whitening_matrix`)."""


def _split_groups(rows: Tensor, group_size: int) -> Tensor:
    if rows.ndim != 2 or rows.shape[1] % group_size != 0:
        raise ValueError(
            f"rows must have shape (M, C) with C divisible by group_size={group_size}, "
            f"got shape {tuple(rows.shape)}"
        )
    return rearrange(rows, "m (G g) -> G m g", g=group_size)


def group_statistics(rows: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sufficient statistics ``(count, Σx, Σxxᵀ)`` per channel group, in float64.

    Args:
        rows: ``(M, C)`` samples in rows; ``C`` must be a multiple of ``group_size``.
        group_size: channels per group ``g``.

    Returns:
        ``count`` of shape ``()``, ``sums`` of shape ``(G, g)`` and ``second`` (uncentred second moment
        ``Σ x xᵀ``) of shape ``(G, g, g)``, all float64.

    Shape:
        - rows: :math:`(M, C)`
        - output: :math:`()`, :math:`(G, g)`, :math:`(G, g, g)` with :math:`G = C / g`

    Example:
        >>> count, sums, second = group_statistics(torch.randn(100, 8), group_size=4)
        >>> count.item(), sums.shape, second.shape
        (100.0, torch.Size([2, 4]), torch.Size([2, 4, 4]))
    """
    grouped = _split_groups(rows.to(working_dtype(rows.dtype)), group_size)
    count = rows.shape[0]
    if count > 0:
        mean = grouped.mean(dim=1, keepdim=True)
    else:  # an empty shard of an uneven distributed batch contributes zeros
        mean = grouped.new_zeros(grouped.shape[0], 1, group_size)
    centred = grouped - mean
    scatter = (centred.mT @ centred).to(STATISTICS_DTYPE)
    mean = mean.to(STATISTICS_DTYPE)
    second = scatter + count * (mean.mT @ mean)
    sums = count * mean.squeeze(1)
    # torch.full, not torch.tensor: no host-to-device copy, so that a CUDA graph can capture it.
    return torch.full((), float(count), dtype=STATISTICS_DTYPE, device=rows.device), sums, second


def moments_from_statistics(count: Tensor, sums: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased covariance ``Σxxᵀ / n - μ μᵀ`` from summed statistics (float64 in, float64 out).

    Shape:
        - count: :math:`()`, sums: :math:`(G, g)`, second: :math:`(G, g, g)`
        - output: mean :math:`(G, g)`, covariance :math:`(G, g, g)`

    Example:
        >>> x = torch.randn(64, 4, dtype=torch.float64)
        >>> mean, cov = moments_from_statistics(*group_statistics(x, group_size=4))
        >>> torch.allclose(cov[0], torch.cov(x.T, correction=0))
        True
    """
    mean = sums / count
    cov = second / count - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    return mean, 0.5 * (cov + cov.mT)


def whitening_matrix(
    cov: Tensor, *, eps: float = 1e-5, root: RootOptions | str | dict | None = None
) -> Tensor:
    """ZCA whitening matrix ``(Σ + eps I)^(-1/2)`` with an *absolute* ridge ``eps``.

    ``eps`` plays the part of BatchNorm's ``eps`` (``(var + eps)^(-1/2)``): it is added to the
    covariance as is. An absolute ridge bounds no condition number (that depends on the data's scale), so
    a relative one at the dtype's rounding level is added as well, ``ε · tr(Σ) / g`` (ε the machine
    epsilon, 1.2e-7 of the mean variance in float32): it certifies the mtp/mpa schedules for every group,
    rank-deficient ones included (DBN after a first convolution sees 27-dimensional patches in 64
    channels), and it is no larger than what the rounding of the covariance's entries already changes.

    Shape:
        - cov: :math:`(*, g, g)`
        - output: :math:`(*, g, g)`

    Example:
        >>> whitening_matrix(4.0 * torch.eye(2), eps=0.0)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]])
    """
    ridge = eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return inv_sqrtm(cov + ridge, root, eps=RELATIVE_FLOOR_ULPS * torch.finfo(cov.dtype).eps)


def group_whiten(rows: Tensor, mean: Tensor, whitening: Tensor) -> Tensor:
    """Apply ``(x - μ_G) W_G`` to every channel group of ``rows`` (one batched matrix product).

    ``rows`` is promoted to ``whitening``'s dtype; the result keeps that dtype.

    Shape:
        - rows: :math:`(M, C)`, mean: :math:`(G, g)`, whitening: :math:`(G, g, g)`
        - output: :math:`(M, C)`

    Example:
        >>> rows = torch.randn(10, 4)
        >>> out = group_whiten(rows, torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
        >>> torch.equal(out, rows)
        True
    """
    group_size = whitening.shape[-1]
    grouped = _split_groups(rows.to(whitening.dtype), group_size)
    whitened = (grouped - mean.to(whitening.dtype).unsqueeze(1)) @ whitening
    return rearrange(whitened, "G m g -> m (G g)")
