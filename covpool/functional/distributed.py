"""A differentiable all-reduce (sum) for the sufficient statistics of synchronised layers.

``y = Σ_r x_r`` over the ranks of a process group. Every rank's loss depends on ``y``, and the total loss
is the sum of the ranks' losses, so ``∂L/∂x_r = Σ_r' ∂L_r'/∂y``: the backward is again an all-reduce
(sum) of the incoming gradients. All tensors travel packed in one flat buffer, so a forward costs one
collective and a backward one more, whatever the number of statistics. Works on every backend that
supports ``all_reduce`` (gloo on CPU included) and with a different batch size on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed(process_group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``process_group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _packed_all_reduce(tensors: tuple[Tensor, ...], process_group: dist.ProcessGroup | None) -> list[Tensor]:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    pieces = flat.split([t.numel() for t in tensors])
    return [piece.view_as(t) for piece, t in zip(pieces, tensors, strict=True)]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, process_group, *tensors: Tensor):  # noqa: D102
        ctx.process_group = process_group
        return tuple(_packed_all_reduce(tensors, process_group))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # noqa: D102
        return (None, *_packed_all_reduce(grads, ctx.process_group))


def all_reduce_sum(*tensors: Tensor, process_group: dist.ProcessGroup | None = None) -> tuple[Tensor, ...]:
    """Sum each tensor over the ranks of ``process_group``, differentiably, in one collective.

    Every rank must call it (and its backward) with tensors of the same shapes and one common dtype.
    Returns the inputs unchanged when :func:`is_distributed` is false.

    Shape:
        - tensors: any shapes
        - output: the same shapes

    Example:
        >>> count, total = all_reduce_sum(torch.tensor(3.0), torch.ones(4))  # not distributed: identity
        >>> total
        tensor([1., 1., 1., 1.])
    """
    if not is_distributed(process_group):
        return tensors
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise TypeError(f"tensors must share one dtype (one buffer), got {sorted(map(str, dtypes))}")
    return _AllReduceSum.apply(process_group, *tensors)
