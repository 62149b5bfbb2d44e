"""So-ViT: timm's ``VisionTransformer`` classifying from its class token and second-order visual tokens.

Paper: J. Xie, R. Zeng, Q. Wang, Z. Zhou, P. Li, "So-ViT: Mind Visual Tokens for Vision Transformer",
arXiv:2104.10935.

The backbone is timm's own :class:`timm.models.VisionTransformer` (same parameter names, so timm ViT
checkpoints load into it, positional embeddings resized by timm's filter); its linear ``head`` is replaced by
:class:`covpool.SecondOrderTokenHead`, which takes all tokens of ``forward_features`` and splits off the
``num_prefix_tokens`` itself. Design choices: the backbone is the plain ViT (the paper also changes the
patch embedding to a convolutional stem, which we leave to the backbone choice); ``global_pool`` is
``"token"`` (the class token is the head's first-order branch) or ``""`` (unpooled tokens, timm's
``reset_classifier(0, "")``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from covpool.functional.covariance import MIN_POSITIONS
from covpool.layers import SecondOrderTokenHead
from covpool.linalg import RootOptions
from covpool.models.pretrained import backbone_filter_fn, require_weight_source

__all__ = ["SoViT"]


class SoViT(VisionTransformer):
    """timm VisionTransformer whose head is :class:`covpool.SecondOrderTokenHead`.

    Args:
        num_classes: classifier outputs; 0 for pre-logits features only.
        reduction_dim: width the visual tokens are projected to before their covariance.
        root: options of the head's matrix square root (:class:`covpool.RootOptions`, a method name or a
            dict), passed unchanged to the head.
        drop_rate: dropout before the classifier.
        global_pool (in ``kwargs``): ``"token"`` (default) or ``""`` (no pooling, with ``num_classes=0``).
        **kwargs: further :class:`timm.models.VisionTransformer` arguments (``img_size``, ``depth`` ...).

    Shape:
        - input: (B, in_chans, H, W)
        - ``forward_features``: (B, num_prefix_tokens + H * W / patch_size ** 2, embed_dim)
        - output: (B, num_classes), or (B, head_hidden_size) from ``forward_head(x, pre_logits=True)``

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_small_patch16_224_sovit", num_classes=10, img_size=32, depth=1)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        reduction_dim: int = 64,
        root: RootOptions | str | dict | None = None,
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        global_pool = kwargs.setdefault("global_pool", "token")
        if global_pool not in ("token", ""):
            raise ValueError(
                f"SoViT pools with the class token and the covariance of the visual tokens: expected "
                f"global_pool='token' (default) or global_pool='' (no pooling, with num_classes=0: forward "
                f"returns the tokens, as a timm ViT), got {global_pool!r}"
            )
        super().__init__(num_classes=0, device=device, dtype=dtype, **kwargs)
        if self.patch_embed.num_patches < MIN_POSITIONS:
            raise ValueError(
                f"SoViT with img_size={self.patch_embed.img_size} and patch_size="
                f"{self.patch_embed.patch_size} has {self.patch_embed.num_patches} visual token(s); its "
                f"second-order head needs at least {MIN_POSITIONS} (the covariance of one token is zero): "
                f"use a larger img_size or a smaller patch_size"
            )
        self.num_classes = num_classes
        self.head = SecondOrderTokenHead(
            self.embed_dim,
            num_classes,
            num_prefix_tokens=self.num_prefix_tokens,
            reduction_dim=reduction_dim,
            root=root,
            drop_rate=drop_rate,
            pool_type=global_pool,
            device=device,
            dtype=dtype,
        )
        self.head_hidden_size = self.head.num_features

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer of the head."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with one for ``num_classes`` (0: pre-logits features).

        ``global_pool``: ``None`` keeps the pooling, ``""`` removes it (with ``num_classes=0``: ``forward``
        returns the tokens, as a timm ViT does), ``"token"`` restores the So-ViT pooling.
        """
        self.head.reset(num_classes, global_pool)
        self.num_classes = num_classes
        self.global_pool = self.head.pool_type

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classify tokens ``x`` (B, L, C), or return the head's pooled vector if ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)


def _create_sovit(variant: str, pretrained: bool = False, **kwargs: Any) -> SoViT:
    require_weight_source(variant, pretrained, kwargs)
    filter_fn = partial(
        backbone_filter_fn,
        discard_prefixes=("head.", "fc_norm.", "attn_pool."),
        strict=kwargs.pop("pretrained_strict", True),
        base_filter=checkpoint_filter_fn,
    )
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        SoViT,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "paper_ids": "arXiv:2104.10935",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vit_tiny_patch16_224_sovit": _cfg(),
        "vit_small_patch16_224_sovit": _cfg(),
        "vit_base_patch16_224_sovit": _cfg(),
    }
)


@register_model
def vit_tiny_patch16_224_sovit(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """ViT-Ti/16 with a second-order token head."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_sovit("vit_tiny_patch16_224_sovit", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small_patch16_224_sovit(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """ViT-S/16 with a second-order token head."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_sovit("vit_small_patch16_224_sovit", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_base_patch16_224_sovit(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """ViT-B/16 with a second-order token head."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_sovit("vit_base_patch16_224_sovit", pretrained, **dict(model_args, **kwargs))
