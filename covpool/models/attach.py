"""Turn an existing timm model into a covariance-pooled one, keeping its weights: :func:`attach_head`.

The model's own classifier is removed (``reset_classifier(0, "")``) and its ``forward_features`` output goes
to a covariance head: :class:`covpool.CovPoolHead` (``head="isqrtcov"``) for CNNs returning (N, C, H, W),
or for token models returning (N, L, C) (prefix tokens dropped first); :class:`covpool.SecondOrderTokenHead`
(``head="sovit"``) for token models with ``num_prefix_tokens``. The layout is found by one probe pass at
attach time, so unsupported models (e.g. channels-last Swin features) fail there with a clear message.
Backbone parameters the probe does not reach (the norm of a ConvNeXt head, a ViT's ``fc_norm``) are kept
in the state dict but frozen (``requires_grad=False``), so optimisers and DDP skip them.

The registered ``*_isqrtcov`` / ``*_sovit`` models build the same thing from timm's own classes with
backbone keys at the top level; :func:`attach_head` wraps, so its backbone keys start with ``backbone.``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from covpool.functional.covariance import MIN_POSITIONS
from covpool.layers import CovPoolHead, SecondOrderTokenHead
from covpool.models.isqrtcov_resnet import IsqrtCovResNet
from covpool.models.pretrained import create_timm_model
from covpool.models.sovit import SoViT

__all__ = ["HEADS", "CovPooledModel", "attach_head"]

HEADS = ("isqrtcov", "sovit")


class CovPooledModel(nn.Module):
    """A timm backbone without its classifier, followed by a covariance head, with the timm model API.

    Args:
        backbone: timm model whose ``forward_features`` feeds ``head``.
        head: a covpool head (``reset``, ``forward(x, pre_logits)``, ``num_features``, ``fc``).
        num_classes: classifier outputs of ``head``.
        drop_prefix_tokens: leading tokens removed before ``head`` (for token features and a head that
            pools all tokens it gets).

    Shape:
        - input: what ``backbone`` takes, (B, in_chans, H, W)
        - ``forward_features``: (B, C, H', W') or (B, L, C), ``C = num_features``
        - output: (B, num_classes), or (B, head_hidden_size) from ``forward_head(x, pre_logits=True)``

    Example:
        >>> import timm, torch
        >>> from covpool.layers import CovPoolHead
        >>> backbone = timm.create_model("resnet18", num_classes=0)
        >>> model = CovPooledModel(backbone, CovPoolHead(512, 10, reduction_dim=16), num_classes=10)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module, *, num_classes: int, drop_prefix_tokens: int = 0
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.drop_prefix_tokens = drop_prefix_tokens
        self.num_classes = num_classes
        self.num_features = backbone.num_features
        self.head_hidden_size = head.num_features
        self.pretrained_cfg = {
            **getattr(backbone, "pretrained_cfg", {}),
            "classifier": "head.fc",
            "num_classes": self.num_classes,
        }
        self.default_cfg = self.pretrained_cfg

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer of the head."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with one for ``num_classes`` (0: pre-logits features).

        ``global_pool``: ``None`` keeps the pooling, ``""`` removes it (with ``num_classes=0``: ``forward``
        returns the backbone's features, as timm's models do), the head's ``POOL_TYPE`` restores it.
        """
        self.head.reset(num_classes, global_pool)
        self.num_classes = num_classes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the backbone."""
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's no-weight-decay parameter names, prefixed with ``backbone.``."""
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{name}" for name in names}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map or tokens."""
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Covariance-pool the features and classify, or return the pooled vector if ``pre_logits``
        (the features themselves when the pooling is removed)."""
        if self.head.pool_type == "":
            return x
        if self.drop_prefix_tokens:
            x = x[:, self.drop_prefix_tokens :]
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def attach_head(
    model_or_name: str | nn.Module,
    head: str = "isqrtcov",
    *,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **head_kwargs: Any,
) -> CovPooledModel:
    """Replace the classifier of a timm model by a covariance head, keeping the backbone weights.

    Args:
        model_or_name: a timm model, or a timm model name created with ``timm.create_model(name,
            **model_kwargs)``.
        head: ``"isqrtcov"`` (:class:`covpool.CovPoolHead`) or ``"sovit"``
            (:class:`covpool.SecondOrderTokenHead`, token models only).
        num_classes: classifier outputs; defaults to the model's ``num_classes``.
        model_kwargs: keyword arguments of ``timm.create_model`` when a name is given.
        **head_kwargs: head arguments (``reduction_dim``, ``root``, ``drop_rate``, ``eps`` ...).

    Returns:
        A :class:`CovPooledModel` holding the model (same module, modified in place) as ``backbone``.

    Raises:
        ValueError: unknown ``head``, a model that already has a covariance head, ``head="sovit"`` on a
            CNN or on a token model without a class token (e.g. register tokens only), features that are
            neither (N, C, H, W) nor (N, L, C) with C = ``num_features``, or a token model with fewer than
            2 visual tokens at its image size.

    Example:
        >>> import timm, torch
        >>> model = attach_head("resnet18", num_classes=10, reduction_dim=16)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if isinstance(model_or_name, str):
        model = create_timm_model(model_or_name, **(model_kwargs or {}))
    elif isinstance(model_or_name, nn.Module):
        if model_kwargs:
            raise ValueError("model_kwargs is only used with a model name, but a model instance was given")
        model = model_or_name
    else:
        raise TypeError(
            f"model_or_name must be a timm model name or nn.Module, got {type(model_or_name).__name__}"
        )
    if isinstance(model, (IsqrtCovResNet, SoViT, CovPooledModel)):
        raise ValueError(
            f"{type(model).__name__} already has a covariance head (use reset_classifier for new classes)"
        )
    for name in ("forward_features", "reset_classifier", "num_features"):
        if not hasattr(model, name):
            raise ValueError(f"{type(model).__name__} is not a timm classification model: it lacks {name!r}")

    num_classes = model.num_classes if num_classes is None else num_classes
    _remove_classifier(model)
    layout, probe_shape = _probe_layout(model)
    width = model.num_features
    param = next(model.parameters())
    factory = dict(device=param.device, dtype=param.dtype)
    prefix = getattr(model, "num_prefix_tokens", 0)
    if layout == "NLC" and probe_shape[1] - prefix < MIN_POSITIONS:
        raise ValueError(
            f"{type(model).__name__} returns {probe_shape[1] - prefix} visual token(s) (features of shape "
            f"{probe_shape} with {prefix} prefix tokens) at its image size; a covariance head needs at least "
            f"{MIN_POSITIONS} (the covariance of one token is zero): create it with a larger img_size or a "
            f"smaller patch_size"
        )
    if head == "sovit":
        if layout != "NLC" or prefix < 1:
            seen = "tokens without one" if layout == "NLC" else "(N, C, H, W) maps"
            raise ValueError(
                f"head='sovit' needs token features (N, L, C) with a class token (num_prefix_tokens >= 1); "
                f"{type(model).__name__} returns {seen}: use head='isqrtcov'"
            )
        if not _has_class_token(model):
            raise ValueError(
                f"head='sovit' classifies from the class token, but {type(model).__name__} has none: its "
                f"num_prefix_tokens={prefix} prefix tokens are register or distillation tokens. Use "
                f"head='isqrtcov' (it drops the prefix tokens and pools the visual ones), or create the "
                f"model with a class token (timm: class_token=True)"
            )
        new_head = SecondOrderTokenHead(
            width, num_classes, num_prefix_tokens=prefix, **head_kwargs, **factory
        )
        return CovPooledModel(model, new_head, num_classes=num_classes)
    new_head = CovPoolHead(width, num_classes, input_format=layout, **head_kwargs, **factory)
    return CovPooledModel(
        model, new_head, num_classes=num_classes, drop_prefix_tokens=prefix if layout == "NLC" else 0
    )


def _has_class_token(model: nn.Module) -> bool:
    """Whether the first prefix token is a class token: timm's ``has_class_token`` where a model sets it,
    else a ``cls_token`` that is not None; models with prefix tokens and neither attribute are taken to
    lead with a class token (timm's order: class, then register or distillation tokens)."""
    has_class_token = getattr(model, "has_class_token", None)
    if has_class_token is not None:
        return bool(has_class_token)
    return getattr(model, "cls_token", True) is not None


def _remove_classifier(model: nn.Module) -> None:
    try:
        model.reset_classifier(0, "")
    except (AssertionError, TypeError, ValueError):  # models whose pooling cannot be switched off
        model.reset_classifier(0)


def _probe_input(model: nn.Module) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    param = next(model.parameters())
    first_conv = cfg.get("first_conv")
    first_conv = first_conv[0] if isinstance(first_conv, (tuple, list)) else first_conv
    try:
        in_chans = model.get_submodule(first_conv).in_channels if first_conv else cfg["input_size"][0]
    except (AttributeError, KeyError):
        in_chans = 3
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        img_size = cfg.get("input_size", (3, 224, 224))[1:] if cfg.get("fixed_input_size") else (64, 64)
    return torch.zeros(2, in_chans, *img_size, device=param.device, dtype=param.dtype)


def _probe_layout(model: nn.Module) -> tuple[str, tuple[int, ...]]:
    """Run ``forward_features`` once: return "NCHW" or "NLC" and the features' shape; freeze parameters
    it does not reach."""
    was_training = model.training
    model.eval()
    try:
        features = model.forward_features(_probe_input(model))
    finally:
        model.train(was_training)
    trainable = [param for param in model.parameters() if param.requires_grad]
    if features.requires_grad:
        grads = torch.autograd.grad(features.float().sum(), trainable, allow_unused=True)
        for param, grad in zip(trainable, grads, strict=True):
            if grad is None:
                param.requires_grad_(False)
    width = model.num_features
    if features.ndim == 4 and features.shape[1] == width:
        return "NCHW", tuple(features.shape)
    if features.ndim == 3 and features.shape[-1] == width:
        return "NLC", tuple(features.shape)
    raise ValueError(
        f"{type(model).__name__}.forward_features returns shape {tuple(features.shape)}; attach_head "
        f"supports (N, C, H, W) feature maps and (N, L, C) tokens with C = num_features = {width} "
        f"(channels-last maps such as Swin's (N, H, W, C) are not supported)"
    )
