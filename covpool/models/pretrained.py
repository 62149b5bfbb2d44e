"""Loading backbone weights into covariance-pooled timm models.

covpool publishes no weights of its own, so the registered models load *backbone* weights from a source the
user names: ``pretrained=True, pretrained_cfg_overlay=dict(file="resnet50.pth")`` (a local file), or
``dict(state_dict=...)``, ``dict(hf_hub_id="timm/resnet50.a1_in1k")`` / ``dict(url=...)`` where a network
is at hand. Without such a source :func:`require_weight_source` fails at once, before any download is tried.

Loading rules (applied by :func:`backbone_filter_fn`, which timm calls on the checkpoint):

- the backbone is loaded strictly: a backbone parameter missing from the checkpoint, or a checkpoint key
  the model does not have, raises ``RuntimeError`` listing them (``pretrained_strict=False`` loads what
  matches by name and keeps the rest as initialised; tensors whose shapes differ still raise);
- the source classifier (``discard_prefixes``, e.g. ResNet's ``fc.*``, ViT's ``head.*``) is dropped;
- the covariance head keeps its fresh initialisation, except for head tensors of the same name and shape
  in the checkpoint (a covpool checkpoint), which are loaded. timm then drops ``head.fc.*`` if
  ``num_classes`` differs from the config's 1000. To restore a full covpool checkpoint as it was saved,
  use ``timm.create_model(name, checkpoint_path=path)`` or ``model.load_state_dict``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn

__all__ = ["backbone_filter_fn", "create_timm_model", "require_weight_source"]

_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CONNECT_TIMEOUT_S = 3.0

_SOURCE_KEYS = ("file", "state_dict", "url", "hf_hub_id")


def require_weight_source(variant: str, pretrained: bool, kwargs: Mapping[str, Any]) -> None:
    """Raise at once if ``pretrained=True`` names no weight source for ``variant``.

    Args:
        variant: registered model name, used in the message.
        pretrained: the ``pretrained`` argument of the model function.
        kwargs: the model function's keyword arguments (``pretrained_cfg``, ``pretrained_cfg_overlay``).

    Example:
        >>> require_weight_source("resnet50_isqrtcov", False, {})  # nothing to check
    """
    if not pretrained:
        return
    sources = {}
    for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
        cfg = kwargs.get(key)
        if cfg is not None and not isinstance(cfg, str):
            cfg = cfg if isinstance(cfg, Mapping) else cfg.to_dict()
            sources.update({k: cfg[k] for k in _SOURCE_KEYS if cfg.get(k)})
    if not sources:
        raise RuntimeError(
            f"{variant}: pretrained=True, but covpool publishes no weights to download for it. Load backbone "
            f"weights from a local checkpoint with pretrained_cfg_overlay=dict(file='path/to/backbone.pth') "
            f"(e.g. the state_dict of the matching timm backbone), or use pretrained=False."
        )


def backbone_filter_fn(
    state_dict: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    discard_prefixes: tuple[str, ...],
    head_prefix: str = "head.",
    strict: bool = True,
    base_filter: Any = None,
) -> dict[str, torch.Tensor]:
    """Map a backbone checkpoint onto ``model``: load the backbone, keep the model's new head.

    Args:
        state_dict: checkpoint tensors by name.
        model: the covariance-pooled model being loaded.
        discard_prefixes: name prefixes of the source model's own classifier, dropped when the model has no
            tensor of that name and shape.
        head_prefix: name prefix of the model's covariance head.
        strict: raise on backbone tensors missing from the checkpoint or checkpoint keys the model lacks.
        base_filter: timm's own filter for the backbone family (``fn(state_dict, model)``), applied first.

    Returns:
        A state dict with every key of ``model``: backbone tensors from the checkpoint, head tensors from
        the checkpoint where name and shape match, else (and, with ``strict=False``, for backbone tensors
        the checkpoint lacks) the model's current ones.

    Example:
        >>> import timm
        >>> src = timm.create_model("resnet18", num_classes=10).state_dict()
        >>> model = timm.create_model("resnet18_isqrtcov", num_classes=5, reduction_dim=8)
        >>> sd = backbone_filter_fn(src, model, discard_prefixes=("fc.",))
        >>> model.load_state_dict(sd)
        <All keys matched successfully>
    """
    if base_filter is not None:
        state_dict = base_filter(state_dict, model)
    current = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in state_dict.items():
        if name.startswith(head_prefix) and name in current:
            if tensor.shape == current[name].shape:
                out[name] = tensor
        elif name in current:
            out[name] = tensor
        elif not name.startswith(discard_prefixes):
            unexpected.append(name)
    missing = [name for name in current if not name.startswith(head_prefix) and name not in out]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"Backbone checkpoint does not match {type(model).__name__}: missing backbone keys "
            f"{_preview(missing)}, unexpected keys {_preview(unexpected)}. Expected the state_dict of the "
            f"matching timm backbone (pass pretrained_strict=False to load what matches)."
        )
    for name, tensor in current.items():
        out.setdefault(name, tensor)
    return out


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def _download_host(name: str, overlay: Mapping[str, Any]) -> str | None:
    """Host ``timm.create_model(name, pretrained=True)`` would download from; None if nothing to fetch."""
    if overlay.get("file") or overlay.get("state_dict"):
        return None
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    hub_id = overlay.get("hf_hub_id") or (cfg.hf_hub_id if cfg is not None else None)
    url = overlay.get("url") or (cfg.url if cfg is not None else None)
    if hub_id:
        if any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in _HUB_WEIGHT_FILES):
            return None
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    if url:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        return None if os.path.exists(cached) else urlparse(url).hostname
    return None


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, failing at once when pretrained weights cannot be fetched.

    timm retries an unreachable hub for about a minute before it gives up; this checks first (weights in
    the local caches, else one connection with a 3 s timeout) and raises a ``RuntimeError`` that says
    how to load the weights from a local file instead.

    Example:
        >>> create_timm_model("resnet18", num_classes=10).num_classes
        10
    """
    if kwargs.get("pretrained"):
        host = _download_host(name, kwargs.get("pretrained_cfg_overlay") or {})
        if host is not None:
            try:
                socket.create_connection((host, 443), timeout=_CONNECT_TIMEOUT_S).close()
            except OSError as error:
                raise RuntimeError(
                    f"pretrained=True needs the weights of {name!r} from {host}, which cannot be reached "
                    f"from this machine ({error}). Save them where there is a network and pass "
                    f"pretrained_cfg_overlay=dict(file='path/to/weights.pth'), or use pretrained=False."
                ) from error
    return timm.create_model(name, **kwargs)
