"""So-ViT classifier head: class token plus second-order pooling of the visual tokens.

Xie, Zeng, Wang, Li, Zhang, "So-ViT: Mind Visual Tokens for Vision Transformer", 2021. The class token
feeds one linear classifier; the visual tokens (those after the ``num_prefix_tokens`` class / register /
distillation tokens) go through an optional linear reduction to ``d`` dimensions (64 by default, as in
So-ViT), their ``d × d`` covariance, its square root (:func:`covpool.sqrtm`) and the upper-triangular
vector, which feeds a second linear classifier; the logits are the sum of the two.

Design: the two classifiers are one :class:`torch.nn.Linear` on the concatenation
``[class token, triu vector]`` — a linear map of a concatenation is exactly the sum of two linear maps,
with the two biases merged into one. So ``pre_logits=True`` returns that concatenation and
``num_features = C + d (d + 1) / 2`` is well defined for timm. As in :class:`covpool.CovPoolHead`, the
off-diagonal entries are scaled by ``√2``, a relative ridge ``eps`` guards singular covariances (fewer
visual tokens than ``d``), and the covariance and root run in float32 under autocast.
"""

import torch
from torch import Tensor, nn

from covpool.checks import check_positive_int
from covpool.functional.covariance import MIN_POSITIONS
from covpool.layers.constructor_doc import document_init
from covpool.layers.head_base import CovarianceHead
from covpool.linalg import RootOptions


@torch.jit.ignore
def checked_tokens(x: Tensor, in_features: int, num_prefix_tokens: int) -> Tensor:
    """``x`` after the checks of :class:`SecondOrderTokenHead`. Opaque to ``torch.fx``, a Python call under
    TorchScript (:mod:`covpool.layers.head_base`)."""
    if not torch.is_floating_point(x):
        raise TypeError(
            f"SecondOrderTokenHead: input must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}"
        )
    if x.ndim != 3 or x.shape[2] != in_features:
        raise ValueError(
            f"SecondOrderTokenHead expects tokens of shape (N, L, {in_features}), got shape {tuple(x.shape)}"
        )
    visual_tokens = x.shape[1] - num_prefix_tokens
    if visual_tokens < MIN_POSITIONS:
        raise ValueError(
            f"SecondOrderTokenHead needs at least {MIN_POSITIONS} visual tokens after the "
            f"num_prefix_tokens={num_prefix_tokens} prefix tokens "
            f"(L >= {num_prefix_tokens + MIN_POSITIONS}), got shape {tuple(x.shape)} "
            f"({max(visual_tokens, 0)} visual tokens): the covariance of one token is zero, so the "
            f"second-order branch would be the same for every input. Feed larger "
            f"images or use a smaller patch size"
        )
    return x


torch.fx.wrap("checked_tokens")


@document_init
class SecondOrderTokenHead(CovarianceHead):
    """So-ViT head: ``fc([class token, triu(Σ^(1/2) of the visual tokens)])``.

    The class token is the first token (timm's order: class, then register or distillation tokens).

    Args:
        in_features: token width ``C``.
        num_classes: classifier outputs; 0 for no classifier (``forward`` returns the features).
        num_prefix_tokens: leading non-visual tokens, at least 1 (the class token).
        reduction_dim: ``d`` of the linear reduction of the visual tokens; ``None`` for none (``d = C``).
        root: options of the matrix square root (:class:`covpool.RootOptions`, a method name, or a dict
            of its fields; default ``"auto"``), passed unchanged to :func:`covpool.sqrtm`.
        drop_rate: dropout on the concatenated features.
        eps: relative ridge before the root (see :func:`covpool.functional.sqrt_covariance_pool`).
        pool_type: ``"token"`` (default: class token and second-order pooling, timm's name for a ViT that
            classifies from its class token) or ``""`` (no pooling, with ``num_classes=0``: ``forward``
            returns the tokens, timm's unpooled convention).
        device: where the parameters and buffers are created (a factory argument, as in torch.nn).
        dtype: the dtype the parameters and buffers are created in (a factory argument).

    Attributes:
        num_features: width of the pre-logits features, ``C + d (d + 1) / 2``.
        in_features: ``C``.

    Raises:
        TypeError: in ``forward``, input that is not floating point.
        ValueError: in ``forward``, fewer than 2 visual tokens, whose covariance is zero whatever the input;
            a batch the head rejects (NaN/Inf, a covariance the root refuses), which leaves every buffer
            unchanged.

    Shape:
        - input: :math:`(N, L, C)` with ``num_prefix_tokens`` leading prefix tokens and at least 2 visual ones
        - output: :math:`(N, C + d (d + 1) / 2)` with ``pre_logits=True``,
          else :math:`(N, \\text{num_classes})`

    Example:
        >>> head = SecondOrderTokenHead(32, 10, reduction_dim=8)
        >>> tokens = torch.randn(2, 1 + 49, 32)
        >>> head(tokens).shape, head(tokens, pre_logits=True).shape
        (torch.Size([2, 10]), torch.Size([2, 68]))
    """

    POOL_TYPE = "token"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        num_prefix_tokens: int = 1,
        reduction_dim: int | None = 64,
        root: RootOptions | str | dict | None = None,
        drop_rate: float = 0.0,
        eps: float = 1e-4,
        pool_type: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, root=root, eps=eps, pool_type=pool_type, device=device, dtype=dtype)
        check_positive_int(num_prefix_tokens, "num_prefix_tokens")
        self.num_prefix_tokens = num_prefix_tokens
        dim = self._build_reduction(
            reduction_dim, lambda d: nn.Linear(in_features, d, bias=False, **self._factory)
        )
        self._build_classifier(in_features + dim * (dim + 1) // 2, num_classes, drop_rate)

    def _pooled_features(self, x: Tensor) -> Tensor:
        x = checked_tokens(x, self.in_features, self.num_prefix_tokens)
        pooled = self._pool(self.reduce(x[:, self.num_prefix_tokens :]))
        return torch.cat([x[:, 0].to(pooled.dtype), pooled], dim=-1)
