"""Swap BatchNorm layers of a model for ZCA batch norm, like ``SyncBatchNorm.convert_sync_batchnorm``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

from covpool.layers.zca_batchnorm import ZCABatchNorm1d, ZCABatchNorm2d, _ZCABatchNorm

_REPLACEMENTS: dict[type[nn.Module], type[_ZCABatchNorm]] = {
    nn.BatchNorm1d: ZCABatchNorm1d,
    nn.BatchNorm2d: ZCABatchNorm2d,
}
LayerSelector = str | Callable[[str, nn.Module], bool]


def _fitting_group_size(num_features: int, requested: int) -> int:
    """``requested`` if it divides ``num_features``, else the largest divisor of it below ``requested``."""
    return max(d for d in range(1, min(requested, num_features) + 1) if num_features % d == 0)


def _selected(layers: LayerSelector, candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    if layers == "all":
        return candidates
    if layers == "first":
        return candidates[:1]
    if callable(layers):
        return [(name, bn) for name, bn in candidates if layers(name, bn)]
    raise ValueError(f"layers must be 'first', 'all' or a callable (name, bn) -> bool, got {layers!r}")


@torch.no_grad()
def _zca_from_batchnorm(bn: nn.Module, zca_kwargs: dict[str, Any]) -> _ZCABatchNorm:
    kwargs = {
        "eps": bn.eps,
        "momentum": bn.momentum,
        "affine": bn.affine,
        "track_running_stats": bn.track_running_stats,
        **zca_kwargs,
    }
    kwargs["group_size"] = _fitting_group_size(bn.num_features, kwargs.get("group_size", 16))
    reference = next(bn.parameters(), bn.running_mean)
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    zca = _REPLACEMENTS[type(bn)](bn.num_features, **kwargs, **factory)
    if zca.affine and bn.affine:
        zca.weight.copy_(bn.weight)
        zca.bias.copy_(bn.bias)
    if zca.track_running_stats and bn.track_running_stats:
        zca.running_mean.copy_(bn.running_mean)
        variances = rearrange(bn.running_var, "(G g) -> G g", g=zca.group_size)
        zca.running_cov.copy_(torch.diag_embed(variances))
        zca.num_batches_tracked.copy_(bn.num_batches_tracked)
    zca.train(bn.training)
    return zca


def convert_zca_batchnorm(
    module: nn.Module, *, layers: LayerSelector = "first", **zca_kwargs: Any
) -> nn.Module:
    """Replace ``BatchNorm2d`` / ``BatchNorm1d`` layers of ``module`` by ZCA batch norm, in place.

    Only exact ``nn.BatchNorm1d`` and ``nn.BatchNorm2d`` instances are candidates (subclasses such as
    timm's ``BatchNormAct2d``, which fuse an activation, are left alone). Each replacement copies
    ``eps``, ``momentum``, ``affine``, ``track_running_stats``, the affine weights, the running mean,
    the batch counter and the train/eval mode, and starts its running covariance from the BatchNorm's
    running variances on the diagonal, so a converted layer in eval mode computes exactly what the
    BatchNorm did until it is trained. ``zca_kwargs`` (``group_size``, ``root``, ``process_group``,
    ...) go to the new layers and override the copied settings.

    ``group_size`` (default 16) falls back, per layer, to the largest divisor of the layer's channel
    count that does not exceed it (e.g. 16 → 12 for 36 channels, 16 → 1, i.e. plain BatchNorm, for a
    prime channel count), so one setting fits a whole network.

    ``ZCABatchNorm1d`` takes sequences channels-last, ``(N, L, C)``; a ``BatchNorm1d`` that sees
    ``(N, C, L)`` inputs should not be converted (select layers with a callable).

    Args:
        module: the model (or a single BatchNorm layer, which is then returned converted).
        layers: ``"first"`` (the first BatchNorm in ``named_modules`` order), ``"all"``, or a callable
            ``(name, bn) -> bool``.
        **zca_kwargs: keyword arguments of :class:`covpool.ZCABatchNorm2d`.

    Returns:
        ``module`` with the selected layers replaced (a new layer if ``module`` itself was converted).

    Raises:
        ValueError: ``module`` holds no ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` (whatever ``layers``), or
            ``layers`` is not a valid selector.

    Warns:
        UserWarning: a callable ``layers`` selected none of the BatchNorm layers.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU())
        >>> net = convert_zca_batchnorm(net, group_size=16)
        >>> type(net[1]).__name__, net[1].group_size
        ('ZCABatchNorm2d', 16)
    """
    candidates = [(name, m) for name, m in module.named_modules() if type(m) in _REPLACEMENTS]
    selected = _selected(layers, candidates)
    if not candidates:
        subclasses = sorted(
            {type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        )
        skipped = f"; its BatchNorm subclasses {subclasses} are not converted" if subclasses else ""
        raise ValueError(
            f"convert_zca_batchnorm(layers={layers!r}) found no nn.BatchNorm1d or nn.BatchNorm2d in "
            f"{type(module).__name__}, so there is nothing to convert{skipped}. Use a model with "
            f"BatchNorm layers or leave ZCA off (zca=None)"
        )
    if not selected:
        warnings.warn(
            f"convert_zca_batchnorm: the layers predicate selected none of the {len(candidates)} BatchNorm "
            f"layers of {type(module).__name__} ({', '.join(repr(name) for name, _ in candidates[:5])}"
            f"{', ...' if len(candidates) > 5 else ''}); nothing was converted",
            UserWarning,
            stacklevel=2,
        )
    for name, bn in selected:
        zca = _zca_from_batchnorm(bn, zca_kwargs)
        if name == "":
            return zca
        parent_name, _, child_name = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child_name, zca)
    return module
