"""ResNets with an iSQRT-COV head: timm's ``ResNet`` with average pooling replaced by covariance pooling.

Paper: P. Li, J. Xie, Q. Wang, Z. Gao, "Towards Faster Training of Global Covariance Pooling Networks by
Iterative Matrix Square Root Normalization", CVPR 2018 (arXiv:1712.01034).

The backbone is timm's own :class:`timm.models.ResNet` (same parameter names, so timm ResNet checkpoints load
into it); ``global_pool`` and ``fc`` are replaced by :class:`covpool.CovPoolHead` (1x1 reduction to
``reduction_dim`` channels, covariance, matrix square root, upper-triangle vector, linear classifier).

Design choice: as in the paper, the last downsampling is removed, so a 224 px input gives a 14 x 14 map
(196 samples for a 256 x 256 covariance instead of 49). We do it with timm's ``output_stride=16``, which
makes the last stage stride 1 with dilation 2: parameter shapes are unchanged and the receptive field of
pretrained weights is kept (the paper's code uses stride 1 without dilation). Pass ``output_stride=32`` to
keep the downsampling (4 x cheaper head at the cost of fewer samples per covariance).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from covpool.layers import CovPoolHead
from covpool.linalg import RootOptions
from covpool.models.pretrained import backbone_filter_fn, require_weight_source

__all__ = ["IsqrtCovResNet"]


class IsqrtCovResNet(ResNet):
    """timm ResNet whose head is :class:`covpool.CovPoolHead` (iSQRT-COV).

    Args:
        *args: :class:`timm.models.ResNet` arguments (``block``, ``layers``).
        num_classes: classifier outputs; 0 for pre-logits features only.
        reduction_dim: channels after the head's 1x1 reduction; the covariance is ``reduction_dim`` squared.
        root: options of the head's matrix square root (:class:`covpool.RootOptions`, a method name or a
            dict), passed unchanged to the head.
        drop_rate: dropout before the classifier.
        output_stride: 16 (default, last downsampling removed) or 32 (as plain ResNet) or 8.
        global_pool: ``"cov"`` (covariance pooling, the default) or ``""`` (no pooling, with
            ``num_classes=0``: ``forward`` returns the feature map, timm's convention).
        **kwargs: further :class:`timm.models.ResNet` arguments (``in_chans``, ``stem_type`` ...).

    Shape:
        - input: (B, in_chans, H, W)
        - ``forward_features``: (B, num_features, H / output_stride, W / output_stride)
        - output: (B, num_classes), or (B, head_hidden_size) from ``forward_head(x, pre_logits=True)``
          with ``head_hidden_size = reduction_dim * (reduction_dim + 1) / 2``

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18_isqrtcov", num_classes=10, reduction_dim=32)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *args: Any,
        num_classes: int = 1000,
        reduction_dim: int = 256,
        root: RootOptions | str | dict | None = None,
        drop_rate: float = 0.0,
        output_stride: int = 16,
        global_pool: str = "cov",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args,
            num_classes=0,
            global_pool="",
            output_stride=output_stride,
            device=device,
            dtype=dtype,
            **kwargs,
        )
        del self.global_pool, self.fc
        self.num_classes = num_classes
        self.head = CovPoolHead(
            self.num_features,
            num_classes,
            reduction_dim=reduction_dim,
            root=root,
            drop_rate=drop_rate,
            input_format="NCHW",
            pool_type=global_pool,
            device=device,
            dtype=dtype,
        )
        self.head_hidden_size = self.head.num_features

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        """The final linear layer of the head (or its name)."""
        return "head.fc" if name_only else self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with one for ``num_classes`` (0: pre-logits features).

        ``global_pool``: ``None`` keeps the pooling, ``""`` removes it (with ``num_classes=0``: ``forward``
        returns the feature map, as timm's CNNs do), ``"cov"`` restores covariance pooling.
        """
        self.head.reset(num_classes, global_pool)
        self.num_classes = num_classes

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Covariance-pool ``x`` (B, C, H, W) and classify, or return the pooled vector if ``pre_logits``
        (``x`` itself when the pooling is removed)."""
        return self.head(x, pre_logits=pre_logits)


def _create_isqrtcov_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> IsqrtCovResNet:
    require_weight_source(variant, pretrained, kwargs)
    filter_fn = partial(
        backbone_filter_fn, discard_prefixes=("fc.",), strict=kwargs.pop("pretrained_strict", True)
    )
    return build_model_with_cfg(IsqrtCovResNet, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (14, 14),  # the final map at 224 px, output_stride=16 (timm's CNNs: 7 x 7 at 32)
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "head.fc",
        "paper_ids": "arXiv:1712.01034",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "resnet18_isqrtcov": _cfg(),
        "resnet34_isqrtcov": _cfg(),
        "resnet50_isqrtcov": _cfg(),
        "resnet101_isqrtcov": _cfg(),
    }
)


@register_model
def resnet18_isqrtcov(pretrained: bool = False, **kwargs: Any) -> IsqrtCovResNet:
    """ResNet-18 with an iSQRT-COV head (last downsampling removed)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_isqrtcov_resnet("resnet18_isqrtcov", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_isqrtcov(pretrained: bool = False, **kwargs: Any) -> IsqrtCovResNet:
    """ResNet-34 with an iSQRT-COV head (last downsampling removed)."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_isqrtcov_resnet("resnet34_isqrtcov", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_isqrtcov(pretrained: bool = False, **kwargs: Any) -> IsqrtCovResNet:
    """ResNet-50 with an iSQRT-COV head (last downsampling removed), the paper's main model."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_isqrtcov_resnet("resnet50_isqrtcov", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_isqrtcov(pretrained: bool = False, **kwargs: Any) -> IsqrtCovResNet:
    """ResNet-101 with an iSQRT-COV head (last downsampling removed)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_isqrtcov_resnet("resnet101_isqrtcov", pretrained, **dict(model_args, **kwargs))
