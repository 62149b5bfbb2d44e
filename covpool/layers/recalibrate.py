"""Recompute the running statistics of a model's ZCA layers over data, with the model's current weights.

The remedy BatchNorm users know as :func:`torch.optim.swa_utils.update_bn` or PreciseBN (Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021), for :class:`covpool.ZCABatchNorm2d` / :class:`ZCABatchNorm1d`.
A running covariance follows the network with a lag: with ``momentum=0.1`` it is an exponential average
over roughly the last 20 batches, taken while the weights below the layer kept changing. Whitening
divides by the square roots of the covariance's *smallest* eigenvalues, so a lag that BatchNorm shrugs
off (it only rescales each channel by its variance) can move the eval-mode output far from what the
layers above were trained on; after a short fine-tune a model can evaluate at chance while the same
weights with batch statistics do well (docs: Layers, "When the running statistics lag").

Design choices:

- **Exact statistics of the data seen, not an average of batch statistics.** Every recalibrated layer
  accumulates the sufficient statistics ``(count, Σx, Σxxᵀ)`` of all its inputs in float64
  (:func:`covpool.functional.group_statistics`, as the layer itself forms them), and its running mean and
  covariance become the mean and the unbiased (``n / (n - 1)``) covariance of the union of those rows.
  The covariance of the union also counts how the batch means vary, which an average of batch
  covariances (PreciseBN, ``momentum=None``) leaves out, and does not depend on the batch size.
- **The model runs in training mode**, like ``update_bn``: every layer normalises with batch statistics,
  so each ZCA layer sees the activations it saw in training (with the final weights). Dropout is then
  active too. The training flags of every module are restored afterwards.
- **Nothing else changes.** Every buffer of the model that is not recalibrated (BatchNorm's running
  statistics included) is restored to its value before the call; ``batchnorm=True`` recalibrates
  :class:`torch.nn.BatchNorm1d/2d/3d` (and ``SyncBatchNorm``) the same way, exactly as ``update_bn``
  intends. If anything raises, every buffer is restored, so a failed call leaves the model unchanged.
- **Distributed.** Under ``torch.distributed`` each rank runs its own loader (e.g. with a
  ``DistributedSampler``) and the statistics are summed over the layer's ``process_group`` at the end
  (one collective per group), so every rank ends with the statistics of the union of all ranks' data.
  The ZCA layers all-reduce every batch in training mode, so every rank must run the same number of
  batches; when the loaders have a length this is checked before the first batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

from covpool.checks import has_forward
from covpool.functional.distributed import all_reduce_sum, is_distributed
from covpool.functional.whitening import STATISTICS_DTYPE, group_statistics, moments_from_statistics
from covpool.layers.zca_batchnorm import ZCABatchNorm1d, ZCABatchNorm2d, _ZCABatchNorm

ZCA_LAYERS = (ZCABatchNorm1d, ZCABatchNorm2d)
"""The layer types :func:`recalibrate_statistics` always recalibrates."""


def zca_layers(model: nn.Module) -> dict[str, _ZCABatchNorm]:
    """The ZCA layers of ``model`` that keep running statistics, by their ``named_modules`` name.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 1), ZCABatchNorm2d(8, group_size=4), nn.BatchNorm2d(8))
        >>> list(zca_layers(net))
        ['1']
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, ZCA_LAYERS) and module.track_running_stats
    }


def _batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    }


def default_batch_input(batch: Any) -> Tensor:
    """The model input of a loader batch: the batch itself if a tensor, else the first element of a tuple
    or list (``(input, target, ...)``, as ``TensorDataset`` and the torchvision datasets give).

    Example:
        >>> default_batch_input((torch.zeros(2, 3), torch.tensor([0, 1]))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        seen = f"a dict with keys {sorted(map(str, batch))}"
    elif isinstance(batch, (tuple, list)):
        first = type(batch[0]).__name__ if batch else "nothing"
        seen = f"a {type(batch).__name__} of {len(batch)} whose first element is {first}"
    else:
        seen = f"a {type(batch).__name__}"
    raise TypeError(
        "a loader batch must be a Tensor or a tuple/list whose first element is the input Tensor, got "
        f"{seen}; pass batch_to_input=..., e.g. batch_to_input=lambda batch: batch['image']"
    )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {key: _to_device(v, device) for key, v in value.items()}
    return value


class _Accumulator:
    """Forward pre-hook that sums ``(count, Σx, Σxxᵀ)`` of a layer's inputs in float64, per group.

    A batch whose statistics are not finite is left out, as the layers leave it out of their running
    statistics. Everything stays on the device: no value is read on the host per batch.
    """

    def __init__(self, layer: nn.Module) -> None:
        if isinstance(layer, _ZCABatchNorm):
            self.group_size, self.to_rows = layer.group_size, layer._to_rows
        else:  # BatchNorm: channels in dim 1, one "group" per channel
            self.group_size, self.to_rows = 1, lambda x: rearrange(x, "n c ... -> (n ...) c")
        groups = layer.num_features // self.group_size
        device = layer.running_mean.device
        zeros = {"dtype": STATISTICS_DTYPE, "device": device}
        self.count = torch.zeros((), **zeros)
        self.sums = torch.zeros(groups, self.group_size, **zeros)
        self.second = torch.zeros(groups, self.group_size, self.group_size, **zeros)
        self.batches = torch.zeros((), dtype=torch.long, device=device)

    def statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.count, self.sums, self.second

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 or float64, as the layer
            count, sums, second = group_statistics(self.to_rows(x), self.group_size)
        finite = torch.isfinite(sums).all() & torch.isfinite(second).all()
        self.count += torch.where(finite, count, 0.0)
        self.sums += torch.where(finite, sums, 0.0)
        self.second += torch.where(finite, second, 0.0)
        self.batches += finite


def _check_same_batch_count(loader: Iterable, max_batches: int | None, device: torch.device) -> None:
    """Under ``torch.distributed``: raise on every rank if the ranks would run different batch counts."""
    planned = _length(loader, max_batches)
    if planned is None:
        return
    extremes = torch.tensor([planned, -planned], dtype=torch.long, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    most, fewest = int(extremes[0]), -int(extremes[1])
    if most != fewest:
        raise ValueError(
            f"the ranks would run between {fewest} and {most} batches (this rank {planned}); the ZCA layers "
            "synchronise every batch, so every rank must run the same number: use a DistributedSampler "
            "(drop_last or padding) or set max_batches"
        )


def _reduce(accumulators: dict[str, _Accumulator], layers: dict[str, nn.Module]) -> None:
    """Sum the statistics over the ranks, one collective per process group."""
    by_group: dict[Any, list[str]] = {}
    for name, layer in layers.items():
        by_group.setdefault(getattr(layer, "process_group", None), []).append(name)
    for group, names in by_group.items():
        if not is_distributed(group):
            continue
        tensors = [t for n in names for t in accumulators[n].statistics()]
        reduced = all_reduce_sum(*tensors, process_group=group)
        for i, name in enumerate(names):
            acc = accumulators[name]
            acc.count, acc.sums, acc.second = reduced[3 * i : 3 * i + 3]


def _write(layer: nn.Module, acc: _Accumulator) -> None:
    """Set the layer's running statistics to the mean and unbiased covariance of everything it saw."""
    mean, cov = moments_from_statistics(acc.count, acc.sums, acc.second)
    unbiased = cov * (acc.count / (acc.count - 1).clamp_min(1))
    layer.running_mean.copy_(mean.reshape(-1))
    if isinstance(layer, _ZCABatchNorm):
        layer.running_cov.copy_(unbiased)
    else:
        layer.running_var.copy_(unbiased.reshape(-1))
    layer.num_batches_tracked.copy_(acc.batches)


def recalibrate_statistics(
    model: nn.Module,
    loader: Iterable,
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    batch_to_input: Callable[[Any], Any] | None = None,
    forward_fn: Callable[[Any], Any] | None = None,
    batchnorm: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Set the running mean and covariance of every ZCA layer of ``model`` to the exact statistics of its
    inputs over ``loader``, computed with the model's current weights (``update_bn`` for ZCA layers).

    The model runs forward in training mode under ``torch.no_grad``; every module's training flag and
    every other buffer are restored afterwards (see the module docstring for the design). Call it after
    training, or after a fine-tune, before evaluating or exporting the model.

    Args:
        model: a module containing :class:`covpool.ZCABatchNorm2d` / :class:`ZCABatchNorm1d` layers
            (those with ``track_running_stats=False`` have no running statistics and are skipped).
        loader: an iterable of batches, typically the training ``DataLoader`` (its augmentations apply);
            under ``torch.distributed``, this rank's share.
        max_batches: stop after this many batches (``None``: the whole loader).
        device: where the inputs are moved; ``None``: the device of the first ZCA layer's buffers.
        batch_to_input: maps a batch to the model input, called as ``model(batch_to_input(batch))``;
            tensors in its result (also inside lists, tuples, dicts) are moved to ``device``. ``None``:
            :func:`default_batch_input` (a tensor, or the first element of ``(input, target, ...)``).
        forward_fn: how a batch reaches the network when ``model`` is not called itself (a
            LightningModule without ``forward`` whose step calls ``self.net``): called as
            ``forward_fn(batch)`` with the batch's tensors moved to ``device``, in place of
            ``model(batch_to_input(batch))``; its result is ignored.
        batchnorm: also recalibrate the model's BatchNorm layers (their running mean and unbiased
            variance); ``False`` restores them unchanged.
        progress: show a tqdm progress bar (on rank 0 only under ``torch.distributed``).

    Each recalibrated layer's ``num_batches_tracked`` becomes the number of batches it saw in this pass
    (as after ``update_bn``), so a layer with ``momentum=None`` goes on averaging from there.

    Returns:
        For every recalibrated layer (by ``named_modules`` name), the number of rows its statistics are
        over (samples times positions, summed over the ranks).

    Raises:
        ValueError: ``model`` has no ZCA layer with running statistics; ``loader`` yields no batch; the
            ranks would run different numbers of batches; ``max_batches`` is not positive.
        TypeError: a batch is not a tensor or ``(input, ...)`` and no ``batch_to_input`` is given.
        RuntimeError: no recalibrated layer saw any input (they are not on the model's forward path).

    Shape:
        - batches: whatever ``model`` takes, e.g. :math:`(N, C, H, W)` or ``((N, C, H, W), (N,))``
        - recalibrated buffers: ``running_mean`` :math:`(C,)`, ``running_cov`` :math:`(C / g, g, g)`

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), ZCABatchNorm2d(8, group_size=4), nn.ReLU())
        >>> data = [(torch.randn(4, 3, 6, 6), torch.zeros(4)) for _ in range(3)]
        >>> recalibrate_statistics(net, data, progress=False)  # 3 batches of 4 images of 4x4 positions
        {'1': 192}
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be None or >= 1, got {max_batches}")
    layers: dict[str, nn.Module] = dict(zca_layers(model))
    if not layers:
        kinds = "/".join(t.__name__ for t in ZCA_LAYERS)
        raise ValueError(
            f"{type(model).__name__} has no {kinds} layer with running statistics (track_running_stats=True) "
            "to recalibrate; for BatchNorm alone use torch.optim.swa_utils.update_bn"
        )
    if batchnorm:
        layers.update(_batchnorm_layers(model))
    device = torch.device(device) if device is not None else next(iter(layers.values())).running_mean.device
    to_input = batch_to_input or default_batch_input
    distributed = is_distributed()
    if distributed:
        _check_same_batch_count(loader, max_batches, device)

    # Out of inference mode (Lightning validates under it), so that every tensor made here is a normal one.
    with torch.inference_mode(False), torch.no_grad():
        if forward_fn is None:
            if not has_forward(model):
                raise TypeError(
                    f"{type(model).__name__} has no forward, so recalibrate_statistics cannot run a batch "
                    "through it: pass forward_fn=..., how a batch reaches the network, e.g. "
                    "forward_fn=lambda batch: model.net(batch[0])"
                )

            def forward_fn(batch: Any) -> Any:
                return model(_to_device(to_input(batch), device))

        else:
            given = forward_fn

            def forward_fn(batch: Any) -> Any:
                return given(_to_device(batch, device))

        counts = _run(model, loader, layers, max_batches, forward_fn, progress)
    return counts


def _length(loader: Iterable, max_batches: int | None) -> int | None:
    """The number of batches a pass runs, ``None`` when the loader has no length."""
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
    return length if max_batches is None else min(length, max_batches)


def _run(
    model: nn.Module,
    loader: Iterable,
    layers: dict[str, nn.Module],
    max_batches: int | None,
    forward_fn: Callable[[Any], Any],
    progress: bool,
) -> dict[str, int]:
    """The pass of :func:`recalibrate_statistics`; restores every mode and other buffer, even on error."""
    modes = {module: module.training for module in model.modules()}
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    accumulators = {name: _Accumulator(layer) for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(accumulators[name]) for name, layer in layers.items()]
    recalibrated: set[str] = set()
    try:
        model.train()
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        bar = tqdm(
            loader,
            total=_length(loader, max_batches),
            desc=f"recalibrating {len(layers)} layer{'s' * (len(layers) > 1)}",
            unit="batch",
            disable=not progress or rank != 0,
            leave=False,
            dynamic_ncols=True,
        )
        batches = 0
        for batch in bar:
            forward_fn(batch)
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
        bar.close()
        if batches == 0:
            raise ValueError(f"the loader ({type(loader).__name__}) yielded no batch")
        _reduce(accumulators, layers)
        counts = {name: int(acc.count) for name, acc in accumulators.items()}
        unseen = [name for name, count in counts.items() if count == 0]
        if len(unseen) == len(layers):
            raise RuntimeError(
                f"none of the layers {sorted(layers)} received an input in {batches} batches: are they on "
                "the forward path of the model?"
            )
        if unseen:
            warnings.warn(
                f"layers {unseen} received no (finite) input in {batches} batches; their running "
                "statistics are left unchanged",
                stacklevel=3,
            )
        for name, layer in layers.items():
            if counts[name] > 0:
                _write(layer, accumulators[name])
                recalibrated.add(name)
    finally:
        for handle in handles:
            handle.remove()
        buffers = dict(model.named_buffers())
        for name, value in saved.items():
            if name.rpartition(".")[0] not in recalibrated and name in buffers:
                buffers[name].copy_(value)
        for module, mode in modes.items():
            module.train(mode)
    return {name: counts[name] for name in layers if name in recalibrated}
