"""Callbacks: the spectrum of the covariances inside covpool layers, a per-step training history, the
matrices covpool's roots flagged, and the recalibration of ZCA running statistics on the training data.

:class:`CovarianceSpectrumMonitor` watches the layers that form covariances — :class:`covpool.CovPoolHead`
and :class:`covpool.SecondOrderTokenHead` (the covariance of the reduced features that is pooled) and
:class:`covpool.ZCABatchNorm2d` / :class:`covpool.ZCABatchNorm1d` (the batch covariance of each whitening
group). Every ``every_n_steps`` training steps it registers forward hooks, lets the training step run,
logs the spectra and removes the hooks, so the other steps pay nothing.

:class:`FlaggedMatrixMonitor` reads :func:`covpool.flagged_matrices` every few steps (one host read) and
reports, with what to change, the matrices whose roots came out NaN because their spectrum lay beyond the
certified bound: the sync-free path cannot raise, and a NaN in one sample ends a run.

:class:`ZCARecalibration` runs :func:`covpool.recalibrate_statistics` on the training data before every
validation and at the end of fitting, so that validation, test and the saved model whiten with statistics
of the current weights instead of a lagging running average.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from einops import rearrange
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from covpool import (
    CovPoolHead,
    SecondOrderTokenHead,
    ZCABatchNorm1d,
    ZCABatchNorm2d,
    flagged_matrices,
    recalibrate_statistics,
)
from covpool.checks import has_forward
from covpool.functional.covariance import covariance
from covpool.functional.whitening import group_statistics, moments_from_statistics
from covpool.layers.recalibrate import default_batch_input, zca_layers

HEADS = (CovPoolHead, SecondOrderTokenHead)
WHITENING = (ZCABatchNorm1d, ZCABatchNorm2d)


def spectrum_statistics(cov: Tensor, *, rcond: float = 1e-12) -> dict[str, Tensor]:
    """Condition number, eigenvalue range and effective rank of symmetric PSD matrices.

    Eigenvalues come from :func:`torch.linalg.eigvalsh` in float64, negative round-off clamped to 0.
    The effective rank is ``exp(H(p))`` with ``p = λ / Σλ`` and ``H`` the Shannon entropy (Roy & Vetterli,
    2007): ``n`` for ``I_n``, 1 for a rank-one matrix. The condition number ``λmax / λmin`` uses
    ``max(λmin, rcond λmax)`` so a singular matrix reports ``1 / rcond`` instead of infinity.
    Condition number and effective rank are averaged over the batch; ``eig_min`` / ``eig_max`` are the
    extremes over the batch.

    Shape:
        - cov: (*, n, n)
        - output: dict of scalars ``condition_number``, ``eig_min``, ``eig_max``, ``effective_rank``

    Example:
        >>> stats = spectrum_statistics(torch.diag(torch.tensor([4.0, 1.0])))
        >>> round(float(stats["condition_number"]), 6), round(float(stats["effective_rank"]), 4)
        (4.0, 1.6494)
    """
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"`cov` must have shape (*, n, n), got shape {tuple(cov.shape)}")
    eig = torch.linalg.eigvalsh(cov.detach().to(torch.float64).reshape(-1, *cov.shape[-2:])).clamp_min(0)
    lam_min, lam_max = eig[:, 0], eig[:, -1]
    condition = lam_max / torch.maximum(lam_min, rcond * lam_max).clamp_min(torch.finfo(eig.dtype).tiny)
    p = eig / eig.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(eig.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return {
        "condition_number": condition.mean(),
        "eig_min": lam_min.min(),
        "eig_max": lam_max.max(),
        "effective_rank": entropy.exp().mean(),
    }


def pooled_covariance(features: Tensor) -> Tensor:
    """Per-sample covariance of a head's reduced features, as the head pools it.

    Shape:
        - features: (N, d, H, W) maps or (N, L, d) tokens
        - output: (N, d, d)
    """
    tokens = rearrange(features, "n d h w -> n (h w) d") if features.ndim == 4 else features
    return covariance(tokens)


def group_covariance(x: Tensor, group_size: int) -> Tensor:
    """Batch covariance of each whitening group of a ZCA layer's input (over samples and positions).

    Shape:
        - x: (N, C, H, W), (N, L, C) or (N, C)
        - output: (C / group_size, group_size, group_size)
    """
    if x.ndim == 4:
        rows = rearrange(x, "n c h w -> (n h w) c")
    elif x.ndim == 3:
        rows = rearrange(x, "n l c -> (n l) c")
    else:
        rows = x
    return moments_from_statistics(*group_statistics(rows, group_size))[1]


class CovarianceSpectrumMonitor(L.Callback):
    """Log the spectra of the covariances in covpool heads and ZCA layers every ``every_n_steps`` steps.

    For each watched module (found by type, named as in ``model.named_modules()``), logs
    ``spectrum/<name>/condition_number``, ``.../eig_min``, ``.../eig_max`` and ``.../effective_rank`` (see
    :func:`spectrum_statistics`). Heads report the covariance of their reduced features (hook on
    ``head.reduce``), ZCA layers the batch covariance of each channel group of their input (this rank's
    batch under DDP). Hooks exist only during the measured training step.

    Args:
        every_n_steps: measure when ``trainer.global_step`` is a multiple of this.
        heads: watch covariance-pooling heads.
        whitening: watch ZCA whitening layers.

    Example:
        >>> monitor = CovarianceSpectrumMonitor(every_n_steps=50)
        >>> trainer = L.Trainer(callbacks=[monitor])  # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int = 50, *, heads: bool = True, whitening: bool = True) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.heads = heads
        self.whitening = whitening
        self._handles: list[RemovableHandle] = []
        self._covariances: dict[str, Tensor] = {}

    def watched_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules this monitor measures, by name."""
        types = (HEADS if self.heads else ()) + (WHITENING if self.whitening else ())
        return {name: m for name, m in model.named_modules() if types and isinstance(m, types)}

    def _register(self, name: str, module: nn.Module) -> RemovableHandle:
        def store(covariance: Tensor) -> None:
            self._covariances[name] = covariance.detach()

        if isinstance(module, HEADS):
            return module.reduce.register_forward_hook(lambda _m, _args, out: store(pooled_covariance(out)))
        group_size = module.group_size
        return module.register_forward_hook(
            lambda _m, args, _out: store(group_covariance(args[0], group_size))
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            with torch.no_grad():
                for name, module in self.watched_modules(pl_module).items():
                    self._handles.append(self._register(name, module))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()
        covariances, self._covariances = self._covariances, {}
        for name, cov in covariances.items():
            for key, value in spectrum_statistics(cov).items():
                pl_module.log(f"spectrum/{name}/{key}", value.float(), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class TrainingHistory(L.Callback):
    """Record the training loss and step time of every step, and validation metrics at each validation.

    ``steps`` holds ``(global_step, loss)`` after each optimiser step, ``step_times`` the wall time of each
    training batch (forward, backward and optimiser, without data loading), ``validations`` the
    ``(global_step, {name: value})`` of every validation run outside the sanity check.

    Example:
        >>> history = TrainingHistory(monitor=("val/acc1",))
        >>> trainer = L.Trainer(callbacks=[history])  # doctest: +SKIP
    """

    def __init__(self, monitor: tuple[str, ...] = ("val/loss", "val/acc1")) -> None:
        super().__init__()
        self.monitor = monitor
        self.steps: list[tuple[int, float]] = []
        self.step_times: list[float] = []
        self.validations: list[tuple[int, dict[str, float]]] = []
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_times.append(time.perf_counter() - self._start)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        values = {key: float(metrics[key]) for key in self.monitor if key in metrics}
        self.validations.append((trainer.global_step, values))


class FlaggedMatrixMonitor(L.Callback):
    """Report the matrices covpool's roots flagged during training: log their count and warn (or raise).

    A root whose input lies beyond the spectrum bound its plan was certified for returns NaN for that
    matrix and counts it on the device (:func:`covpool.flagged_matrices`), without a synchronisation.
    Every ``every_n_steps`` training steps and at the end of each epoch this callback reads and resets
    the count (one host read), logs ``covpool/flagged_matrices`` at those steps (the matrices flagged
    since the last read, per rank) at those steps and at the end of every epoch (so that a run shorter
    than ``every_n_steps`` reports too), and, when it is not zero, warns with what to change, or raises
    when ``raise_on_flag`` (stopping at the first report instead of training on NaN). It reads a counter
    and calls no forward, so it works on any LightningModule.

    Args:
        every_n_steps: training steps between reads.
        raise_on_flag: raise ``RuntimeError`` instead of warning.

    Example:
        >>> trainer = L.Trainer(callbacks=[FlaggedMatrixMonitor(every_n_steps=100)])  # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int = 50, *, raise_on_flag: bool = False) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.raise_on_flag = raise_on_flag
        self.total = 0
        """Flagged matrices seen on this rank since fitting started."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flagged_matrices(reset=True)  # what earlier work flagged is not this run's
        self.total = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            count = self._report(trainer)
            pl_module.log("covpool/flagged_matrices", float(count), on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every epoch reports, so a run shorter than every_n_steps logs the value too: the matrices flagged
        # since the last read, logged once per epoch.
        count = self._report(trainer)
        pl_module.log("covpool/flagged_matrices", float(count), on_step=False, on_epoch=True)

    def _report(self, trainer: L.Trainer) -> int:
        """Read and reset the count; warn or raise when it is not zero. Returns the count."""
        count = flagged_matrices(reset=True)
        self.total += count
        if not count:
            return count
        message = (
            f"covpool flagged {count} matrices (NaN roots) up to step {trainer.global_step} on rank "
            f"{trainer.global_rank} ({self.total} since fitting started): their spectrum lay beyond the "
            "bound the root was certified for. Raise the layer's eps (a larger ridge), pass a root "
            "condition= at least their condition number (root={'condition': ...}), or root='eigh'; "
            "CovarianceSpectrumMonitor logs the condition numbers the layers see"
        )
        if self.raise_on_flag:
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return count


def _own_iterator_loader(loader: DataLoader) -> DataLoader:
    """``loader``, or a copy without persistent workers if it has them.

    A ``DataLoader`` with persistent workers hands out one iterator and resets it on every ``iter()``: a
    second pass over it in the middle of an epoch (``val_check_interval < 1``) would restart the epoch of the
    training loop. The copy shares dataset, batch sampler, collate function and workers' settings.
    """
    if not (isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0):
        return loader
    if loader.batch_sampler is not None:
        batching = {"batch_sampler": loader.batch_sampler}
    else:  # an IterableDataset, batched by the loader
        batching = {"batch_size": loader.batch_size, "drop_last": loader.drop_last}
    return DataLoader(
        loader.dataset,
        **batching,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
    )


class ZCARecalibration(L.Callback):
    """Recalibrate the running statistics of the ZCA layers on the training data, with the current weights.

    Before every validation during ``fit`` (not the sanity check), before every checkpoint the trainer
    writes and at the end of fitting, runs :func:`covpool.recalibrate_statistics` on the trainer's training
    dataloader: every ZCA layer's running mean and covariance become the exact statistics of its inputs
    over those batches, in training mode, under the trainer's precision and device transfer. BatchNorm
    statistics are left as they are unless ``batchnorm=True``. Validation, every checkpoint (it holds the
    statistics of the weights it saves; the last one those ``fit`` ends with, so that
    ``load_from_checkpoint`` gives the model in memory), ``trainer.test`` and the model left after ``fit``
    therefore use statistics of the weights they are evaluated with. A pass is skipped when no optimiser
    step ran since the last one. The pass runs on forked random generators (CPU and the module's CUDA
    device), so training draws the same numbers as without it. Under DDP every rank runs its shard of the
    training data and the statistics are summed over the ranks.

    Checkpoints: a full checkpoint is recalibrated in the callbacks' ``on_save_checkpoint``, whenever it is
    written; a weights-only one (``ModelCheckpoint(save_weights_only=True)``, which Lightning writes without
    that hook) at the end of an epoch, validation or fit, where this callback runs before
    ``ModelCheckpoint`` (Lightning runs checkpoint callbacks last). A weights-only checkpoint written in the
    middle of an epoch (``every_n_train_steps``) holds the statistics of the last recalibration.

    How a batch reaches the network: ``pl_module(input)`` with the input of a batch (a tensor, or the first
    element of ``(input, target, ...)``), or ``forward_fn(pl_module, batch)`` when given, for a
    LightningModule without ``forward`` (its ``training_step`` calls ``self.net(x)``) or other batches.

    :class:`lightning_modules.CovPoolClassifier` adds this callback with its defaults when its model has
    ZCA layers (``recalibrate_zca=True``); a ``ZCARecalibration`` passed to the ``Trainer`` takes its place.

    Args:
        max_batches: at most this many training batches per recalibration (``None``: the whole training
            loader); the trainer's ``limit_train_batches`` also bounds it. Each costs one forward pass.
        on_validation: recalibrate before every validation during ``fit``.
        on_fit_end: recalibrate at the end of ``fit``.
        on_checkpoint: recalibrate before every checkpoint the trainer writes.
        batchnorm: also recalibrate BatchNorm layers (their running mean and variance).
        progress: show a progress bar; ``None``: when the trainer has one.
        forward_fn: ``forward_fn(pl_module, batch)`` runs a batch (already on the module's device) through
            the network; ``None``: ``pl_module(input)``, which needs a ``forward``.

    Raises:
        TypeError: at ``fit``, a module without ``forward`` and no ``forward_fn``.

    Example:
        >>> recalibration = ZCARecalibration(max_batches=100)
        >>> trainer = L.Trainer(callbacks=[recalibration])  # doctest: +SKIP
        >>> # a LightningModule whose steps call self.net:
        >>> recalibration = ZCARecalibration(forward_fn=lambda module, batch: module.net(batch[0]))
    """

    def __init__(
        self,
        max_batches: int | None = 50,
        *,
        on_validation: bool = True,
        on_fit_end: bool = True,
        on_checkpoint: bool = True,
        batchnorm: bool = False,
        progress: bool | None = None,
        forward_fn: Callable[[L.LightningModule, Any], Any] | None = None,
    ) -> None:
        super().__init__()
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"`max_batches` must be None or >= 1, got {max_batches}")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"`forward_fn` must be callable (module, batch), got {type(forward_fn).__name__}")
        self.max_batches = max_batches
        self.on_validation = on_validation
        self.recalibrate_on_fit_end = on_fit_end
        self.on_checkpoint = on_checkpoint
        self.batchnorm = batchnorm
        self.progress = progress
        self.forward_fn = forward_fn
        self.last_counts: dict[str, int] = {}
        """Rows per layer of the last recalibration (empty before the first)."""
        self._calibrated_at: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._calibrated_at = None
        if not zca_layers(pl_module):
            rank_zero_warn(
                f"ZCARecalibration: {type(pl_module).__name__} has no ZCA layer with running statistics; the "
                "callback does nothing"
            )
        elif self.forward_fn is None and not has_forward(pl_module):
            raise TypeError(
                f"ZCARecalibration: {type(pl_module).__name__} has no forward, so the callback cannot run a "
                "batch through it; say how a batch reaches the network with forward_fn, e.g. "
                "ZCARecalibration(forward_fn=lambda module, batch: module.net(batch[0]))"
            )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.recalibrate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before ModelCheckpoint's save at the epoch's end, for weights-only checkpoints (see the docstring).
        if self.on_checkpoint and trainer.checkpoint_callbacks and self._calibrated_at != trainer.global_step:
            self.recalibrate(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.on_checkpoint or self._calibrated_at == trainer.global_step:
            return
        if self.recalibrate(trainer, pl_module):
            saved = checkpoint.get("state_dict", {})
            for name, value in pl_module.state_dict().items():
                if name in saved:  # the recalibrated buffers, and the others unchanged
                    saved[name] = value

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.recalibrate_on_fit_end and self._calibrated_at != trainer.global_step:
            self.recalibrate(trainer, pl_module)

    def recalibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int]:
        """Recalibrate now on ``trainer.train_dataloader``; returns the rows per layer ({}: nothing done)."""
        loader = trainer.train_dataloader
        if loader is None or not zca_layers(pl_module):
            return {}
        if isinstance(loader, (list, tuple, dict)) or not isinstance(loader, Iterable):
            raise TypeError(
                "ZCARecalibration needs one training dataloader, got "
                f"{type(loader).__name__}; call covpool.recalibrate_statistics with the loader of your choice"
            )
        limits = [n for n in (self.max_batches, trainer.num_training_batches) if n not in (None, math.inf)]
        if limits and min(limits) < 1:
            return {}
        progress = trainer.progress_bar_callback is not None if self.progress is None else self.progress

        def forward_fn(batch: Any) -> Any:
            batch = trainer.strategy.batch_to_device(batch)
            if self.forward_fn is not None:
                return self.forward_fn(pl_module, batch)
            return pl_module(default_batch_input(batch))

        # The pass draws random numbers (sampler, augmentations, dropout): on forked generators, so that
        # training goes on with the numbers it would have drawn without recalibration.
        device = pl_module.device
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices), trainer.precision_plugin.forward_context():
            self.last_counts = recalibrate_statistics(
                pl_module,
                _own_iterator_loader(loader),
                max_batches=int(min(limits)) if limits else None,
                device=device,
                forward_fn=forward_fn,
                batchnorm=self.batchnorm,
                progress=progress,
            )
        self._calibrated_at = trainer.global_step
        return self.last_counts
