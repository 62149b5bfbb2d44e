"""LightningModule that trains or fine-tunes a timm classifier with covariance pooling and ZCA whitening.

The backbone is any timm model (by name) or any ``nn.Module``. ``head`` swaps its global pooling and
classifier for a second-order head with :func:`covpool.attach_head`; ``zca`` swaps batch norms for ZCA
whitening with :func:`covpool.convert_zca_batchnorm`. Fine-tuning gets a separate learning rate for the
new head (``head_lr``); the schedule is a linear warm-up followed by a cosine decay, stepped per batch.
With ZCA layers the module brings :class:`ZCARecalibration`, which recomputes their running statistics on
the training data before each validation and at the end of fitting.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from covpool import CovPoolHead, RootOptions, SecondOrderTokenHead, attach_head, convert_zca_batchnorm
from covpool.layers.recalibrate import zca_layers
from covpool.models import create_timm_model
from lightning_modules.callbacks import FlaggedMatrixMonitor, ZCARecalibration

STAGES = ("train", "val", "test")
COVPOOL_MODEL_MODULES = ["isqrtcov_resnet", "sovit"]
"""Modules (as timm names them) whose registered models take ``root``."""


def build_model(
    model: str | nn.Module,
    *,
    num_classes: int,
    in_chans: int,
    model_kwargs: dict[str, Any] | None,
    head: Literal["isqrtcov", "sovit"] | None,
    head_kwargs: dict[str, Any] | None,
    zca: Literal["first", "all"] | None,
    zca_kwargs: dict[str, Any] | None,
    pretrained: bool,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    root: RootOptions | str | dict[str, Any] | None = None,
) -> nn.Module:
    """Create the network: a timm model (or the given module), then the covpool head and ZCA layers.

    ``root`` (matrix-root options) goes unchanged to every covpool layer built here: the head of a
    registered covpool model, an attached head and the ZCA layers, unless their kwargs name their own.

    Example:
        >>> net = build_model("resnet18", num_classes=10, in_chans=3, model_kwargs=None, head=None,
        ...                   head_kwargs=None, zca=None, zca_kwargs=None, pretrained=False)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if zca not in (None, "first", "all"):
        raise ValueError(f"`zca` must be None, 'first' or 'all', got {zca!r}")
    with_root = {} if root is None else {"root": root}
    if isinstance(model, str):
        covpool_model = timm.models.is_model_in_modules(model, COVPOOL_MODEL_MODULES)
        net = create_timm_model(
            model,
            pretrained=pretrained,
            num_classes=num_classes,
            in_chans=in_chans,
            pretrained_cfg_overlay=pretrained_cfg_overlay,
            **({**with_root, **(model_kwargs or {})} if covpool_model else (model_kwargs or {})),
        )
    elif isinstance(model, nn.Module):
        if pretrained or model_kwargs:
            raise ValueError(
                "`pretrained` and `model_kwargs` need a timm model name for `model`, got an nn.Module"
            )
        net = model
    else:
        raise TypeError(f"`model` must be a timm model name or an nn.Module, got {type(model).__name__}")
    if head is not None:
        net = attach_head(net, head=head, num_classes=num_classes, **{**with_root, **(head_kwargs or {})})
    if zca is not None:
        net = convert_zca_batchnorm(net, layers=zca, **{**with_root, **(zca_kwargs or {})})
    return net


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0.

    Example:
        >>> [round(warmup_cosine(s, warmup_steps=2, total_steps=6), 2) for s in range(6)]
        [0.5, 1.0, 1.0, 0.85, 0.5, 0.15]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class CovPoolClassifier(L.LightningModule):
    """Image classifier on a timm backbone with optional covariance pooling head and ZCA whitening.

    Args:
        model: a timm model name (``"resnet18"``, ``"resnet18_isqrtcov"``, ...) or an ``nn.Module``
            that maps images to logits. A module is not stored in the hyperparameters (they record
            ``model=None``): pass it again, ``CovPoolClassifier.load_from_checkpoint(path, model=net)``;
            without it, loading raises a ``ValueError`` that says so.
        num_classes: number of classes.
        in_chans: number of image channels (timm model names only).
        model_kwargs: further ``timm.create_model`` arguments (``output_stride``, ``reduction_dim`` ...).
        head: ``None`` keeps the model's head; ``"isqrtcov"`` or ``"sovit"`` attach a covpool head.
        head_kwargs: extra arguments of :func:`covpool.attach_head` (e.g. ``reduction_dim``).
        zca: ``None``, ``"first"`` or ``"all"``: which batch norms become ZCA whitening layers.
        zca_kwargs: extra arguments of :func:`covpool.convert_zca_batchnorm`.
        pretrained: load timm's pretrained weights (needs them in the cache or an overlay file).
        pretrained_cfg_overlay: timm ``pretrained_cfg_overlay``, e.g. ``{"file": "weights.safetensors"}``.
        matrix_root: options of every covpool matrix root in the model (:class:`covpool.RootOptions`, a
            method name, or a dict of its fields, as in a YAML config), passed as the layers' ``root``;
            stored as a plain dict. (Not ``root``: data modules use that name for their folder, and Lightning
            merges both sets of hyperparameters.)
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
        lr: learning rate of the backbone.
        head_lr: learning rate of the new head (the covpool head and the classifier); ``None``: ``lr``.
        momentum: SGD momentum.
        weight_decay: weight decay of weights (biases and norm parameters get none).
        warmup_epochs: epochs of linear warm-up before the cosine decay (may be fractional).
        label_smoothing: label smoothing of the cross-entropy.
        recalibrate_zca: when the model has ZCA layers, add a :class:`ZCARecalibration` callback (50
            training batches before each validation and at the end of fitting), unless the ``Trainer``
            already has one, which then takes its options; ``False``: evaluate with the running averages
            of training as they are.

    Metrics, logged per stage as ``{stage}/acc1`` and ``{stage}/acc5`` with ``{stage}/loss``: top-1 and
    top-5 accuracy; with fewer than 5 classes ``acc5`` keeps its name and is the top-``num_classes``
    accuracy, which is 1.

    Shape:
        - input: (B, in_chans, H, W)
        - output: (B, num_classes)

    Example:
        >>> clf = CovPoolClassifier("resnet18", num_classes=10)
        >>> clf(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: str | nn.Module | None = "resnet18",
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        head: Literal["isqrtcov", "sovit"] | None = None,
        head_kwargs: dict[str, Any] | None = None,
        zca: Literal["first", "all"] | None = None,
        zca_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        matrix_root: RootOptions | str | dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.05,
        head_lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        recalibrate_zca: bool = True,
    ) -> None:
        super().__init__()
        if model is None:
            raise ValueError(
                "`model` is None: this is a CovPoolClassifier built around an nn.Module, which checkpoints "
                "do not store (its hyperparameters record model=None). Pass the same architecture again, "
                "e.g. CovPoolClassifier.load_from_checkpoint(path, model=MyNet(...)); the checkpoint's "
                "weights are then loaded into it"
            )
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2, got {num_classes}")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adamw', got {optimizer!r}")
        if warmup_epochs < 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {warmup_epochs}")
        matrix_root = RootOptions.coerce(matrix_root).to_dict() or None  # validated; plain for checkpoints
        if isinstance(model, nn.Module):
            self.save_hyperparameters(ignore=["model"])
            self.hparams["model"] = None  # so that loading a checkpoint without model= raises clearly
        else:
            self.save_hyperparameters()
        self.model = build_model(
            model,
            num_classes=num_classes,
            in_chans=in_chans,
            model_kwargs=model_kwargs,
            head=head,
            head_kwargs=head_kwargs,
            zca=zca,
            zca_kwargs=zca_kwargs,
            pretrained=pretrained,
            pretrained_cfg_overlay=pretrained_cfg_overlay,
            root=matrix_root,
        )
        # "acc5" whatever num_classes, so that monitors on val/acc5 work; it is top-min(5, num_classes).
        metrics = MetricCollection(
            {
                "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            }
        )
        # ModuleDict keys may not shadow nn.Module attributes ("train"), hence the suffix.
        self.metrics = nn.ModuleDict(
            {f"{stage}_metrics": metrics.clone(prefix=f"{stage}/") for stage in STAGES}
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def configure_callbacks(self) -> list[L.Callback]:
        """The callbacks this model needs that the trainer does not have already: a
        :class:`FlaggedMatrixMonitor` (every 50 steps, a NaN root is reported with what to change), and
        :class:`ZCARecalibration` when ``recalibrate_zca`` and the model has ZCA layers."""
        has = {type(callback) for callback in self.trainer.callbacks}
        callbacks: list[L.Callback] = []
        if FlaggedMatrixMonitor not in has:
            callbacks.append(FlaggedMatrixMonitor())
        if (
            self.hparams.get("recalibrate_zca", True)
            and zca_layers(self.model)
            and ZCARecalibration not in has
        ):
            callbacks.append(ZCARecalibration())
        return callbacks

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits.detach(), targets)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", sync_dist=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the new head: covpool heads (found by type) and the model's classifier."""
        modules = [m for m in self.model.modules() if isinstance(m, (CovPoolHead, SecondOrderTokenHead))]
        if hasattr(self.model, "get_classifier"):
            modules.append(self.model.get_classifier())
        seen: set[int] = set()
        for module in modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _param_groups(self) -> list[dict[str, Any]]:
        hp = self.hparams
        head_ids = {id(p) for p in self.head_parameters()} if hp.head_lr is not None else set()
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for p in self.model.parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in head_ids, p.ndim > 1), []).append(p)
        return [
            {
                "params": params,
                "lr": hp.head_lr if is_head else hp.lr,
                "weight_decay": hp.weight_decay if decay else 0.0,
            }
            for (is_head, decay), params in sorted(groups.items())
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self._param_groups()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = round(hp.warmup_epochs * total / epochs)
        scheduler = LambdaLR(optimizer, partial(warmup_cosine, warmup_steps=warmup, total_steps=total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
