"""The training job shared by ``paper_dbn.py`` and ``paper_heads.py``: small models trained from scratch on
scikit-learn's digits with a plain PyTorch loop, several variants times several seeds, mean ± std.

- Data: the 1,797 8x8 digits shipped inside scikit-learn (nothing is downloaded), upsampled to
  ``image_size``, one grey channel, standardised, split 70/15/15 by :class:`DigitsDataModule` with a fixed
  split seed, so every variant and seed is tested on the same 270 images. The tensors live on the device.
- Models: :class:`SmallResNet` (a CIFAR-style ResNet with one basic block per stage and few channels) and
  :func:`tiny_vit` (timm's VisionTransformer with tiny dimensions).
- Training: SGD or AdamW, linear warm-up then cosine decay per step, cross-entropy; the seed sets the
  initialisation (``torch.manual_seed`` before the model is built) and the order of the batches, so a
  run repeats exactly on the same machine. Time per step is the median wall time of one training step
  (forward, backward, optimiser; CUDA synchronised), the first step excluded.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from common import mean_std, write_results
from torch import Tensor, nn

from covpool.bench.budget import run_within_budget
from covpool.bench.report import format_table
from lightning_modules.data import DigitsDataModule

NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplits:
    """Images ``(N, 1, S, S)`` and labels ``(N,)`` of the train, validation and test splits."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def load_digits(*, image_size: int, device: torch.device, split_seed: int = 0) -> DigitsSplits:
    """The digits at ``image_size`` px, one channel, split and standardised as by :class:`DigitsDataModule`.

    Example:
        >>> data = load_digits(image_size=16, device=torch.device("cpu"))
        >>> data.train[0].shape, data.test[0].shape
        (torch.Size([1257, 1, 16, 16]), torch.Size([270, 1, 16, 16]))
    """
    module = DigitsDataModule(image_size=image_size, in_chans=1, seed=split_seed)
    module.setup()
    splits = (module.train_set, module.val_set, module.test_set)
    return DigitsSplits(*(tuple(t.to(device) for t in split.tensors) for split in splits))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a strided 1x1 convolution where shapes change)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem convolution, BatchNorm (the network's first), ReLU, one basic block per
    stage with strides ``(1, 2, ..., 2, last_stride)``, global average pooling and a linear classifier.

    It has the parts of the timm model API that :func:`covpool.attach_head` uses (``forward_features``,
    ``reset_classifier``, ``num_features``, ``pretrained_cfg["first_conv"]``).

    Shape:
        - input: (B, in_chans, S, S)
        - ``forward_features``: (B, widths[-1], S / 2^(stages - 2) / last_stride, same)
        - output: (B, num_classes)

    Example:
        >>> net = SmallResNet(widths=(8, 16, 32), last_stride=1)
        >>> net.forward_features(torch.randn(2, 1, 16, 16)).shape, net(torch.randn(2, 1, 16, 16)).shape
        (torch.Size([2, 32, 8, 8]), torch.Size([2, 10]))
    """

    def __init__(
        self,
        *,
        widths: Sequence[int] = (16, 32, 64),
        in_chans: int = 1,
        num_classes: int = NUM_CLASSES,
        last_stride: int = 2,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        strides = [1] + [2] * (len(widths) - 2) + [last_stride]
        inputs = [widths[0], *widths[:-1]]
        self.stages = nn.Sequential(*map(BasicBlock, inputs, widths, strides))
        self.num_features = widths[-1]
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(widths[-1], num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"first_conv": "conv1", "classifier": "fc"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none); the pooling stays (``global_pool`` is unused)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(F.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def tiny_vit(
    *, image_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, in_chans: int = 1
) -> nn.Module:
    """timm's ``vit_tiny_patch16_224`` with tiny dimensions (MLP ratio 2), classified from its class token.

    Example:
        >>> vit = tiny_vit(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
        >>> vit.forward_features(torch.randn(2, 1, 16, 16)).shape  # class token + 4x4 patches
        torch.Size([2, 17, 32])
    """
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=image_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=NUM_CLASSES,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=2.0,
    )


@dataclass(frozen=True)
class TrainSettings:
    """A training run: ``steps`` optimiser steps of ``batch_size`` images, validation every ``eval_every``."""

    steps: int
    eval_every: int
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    warmup_steps: int = 0


@dataclass(frozen=True)
class Variant:
    """A model to compare: its name, a builder (called after seeding) and its training settings."""

    name: str
    build: Callable[[], nn.Module]
    settings: TrainSettings


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=settings.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=settings.weight_decay,
        )
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"TrainSettings.optimizer must be 'sgd' or 'adamw', got {settings.optimizer!r}")


def _lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled index batches of ``batch_size`` (the last incomplete batch of an epoch dropped)."""
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` in eval mode (restored to its mode afterwards)."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    model.train(was_training)
    return correct / len(labels)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: nn.Module, data: DigitsSplits, settings: TrainSettings, *, seed: int) -> dict:
    """Train ``model`` (already on the data's device) from scratch; returns its figures and curves.

    Returns:
        ``test_error_pct``, ``val_error_pct`` (after the last step), ``time_per_step_ms``, ``train_time_s``,
        ``parameters``, and the curves ``loss`` (one value per step), ``val_steps`` and ``val_acc``.
    """
    images, labels = data.train
    device = images.device
    if settings.batch_size > len(labels):
        raise ValueError(f"batch_size={settings.batch_size} exceeds the {len(labels)} training images")
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    batches = _batches(len(labels), settings.batch_size, generator)
    losses, times, val_steps, val_acc = [], [], [], []
    model.train()
    for step in range(1, settings.steps + 1):
        index = next(batches).to(device)
        _synchronize(device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())  # .item() waits for the step to finish
        times.append(time.perf_counter() - start)
        if step % settings.eval_every == 0 or step == settings.steps:
            val_steps.append(step)
            val_acc.append(accuracy(model, *data.val))
    return {
        "test_error_pct": 100.0 * (1.0 - accuracy(model, *data.test)),
        "val_error_pct": 100.0 * (1.0 - val_acc[-1]),
        "time_per_step_ms": 1e3 * statistics.median(times[1:] or times),
        "train_time_s": sum(times),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss": losses,
        "val_steps": val_steps,
        "val_acc": val_acc,
    }


RUN_COLUMNS = (
    "variant",
    "seed",
    "test_error_pct",
    "val_error_pct",
    "time_per_step_ms",
    "train_time_s",
    "parameters",
    "note",
)
SUMMARY_COLUMNS = (
    "variant",
    "seeds",
    "test_error_pct",
    "test_error_std",
    "val_error_pct",
    "time_per_step_ms",
    "time_per_step_std",
    "parameters",
)


def run_variants(
    variants: Sequence[Variant],
    seeds: Sequence[int],
    data: DigitsSplits,
    *,
    time_budget: float,
    progress: bool,
    desc: str,
) -> tuple[list[dict], list[str]]:
    """Train every variant with every seed, seed by seed (so a spent budget leaves whole seeds).

    Returns ``(runs, skipped)``: one dict per run started (a failed run has a ``note`` and NaN figures)
    and the labels of the runs the budget left out.
    """
    device = data.train[0].device
    items = [(variant, seed) for seed in seeds for variant in variants]

    def run(item: tuple[Variant, int]) -> dict:
        variant, seed = item
        torch.manual_seed(seed)  # the initialisation; the batch order has its own generator
        model = variant.build().to(device)
        return {
            "variant": variant.name,
            "seed": seed,
            **train(model, data, variant.settings, seed=seed),
            "note": "",
        }

    def failed(item: tuple[Variant, int], message: str) -> dict:
        nan = dict.fromkeys(RUN_COLUMNS[2:-1], math.nan)
        return {"variant": item[0].name, "seed": item[1], **nan, "note": message}

    def label(item: tuple[Variant, int]) -> str:
        return f"{item[0].name} seed {item[1]}"

    runs, skipped = run_within_budget(
        items, run, failed, label=label, time_budget=time_budget, progress=progress, desc=desc, unit="run"
    )
    return runs, [label(item) for item in skipped]


def summarize(runs: Sequence[dict], variants: Sequence[str]) -> list[dict]:
    """Per variant: number of finished seeds, mean ± std of test error and time per step, mean val error."""
    rows = []
    for name in variants:
        done = [run for run in runs if run["variant"] == name and not run["note"]]
        test_mean, test_std = mean_std([run["test_error_pct"] for run in done])
        time_mean, time_std = mean_std([run["time_per_step_ms"] for run in done])
        rows.append(
            {
                "variant": name,
                "seeds": len(done),
                "test_error_pct": test_mean,
                "test_error_std": test_std,
                "val_error_pct": mean_std([run["val_error_pct"] for run in done])[0],
                "time_per_step_ms": time_mean,
                "time_per_step_std": time_std,
                "parameters": done[0]["parameters"] if done else math.nan,
            }
        )
    return rows


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` values along the last axis (fewer at the start).

    Example:
        >>> _smooth(np.array([[1.0, 3.0, 5.0, 7.0]]), 2)
        array([[1., 2., 4., 6.]])
    """
    cumulative = np.cumsum(values, axis=-1)
    earlier = np.zeros_like(cumulative)
    earlier[..., window:] = cumulative[..., :-window]
    counts = np.minimum(np.arange(1, values.shape[-1] + 1), window)
    return (cumulative - earlier) / counts


def plot_curves(
    runs: Sequence[dict], groups: dict[str, Sequence[str]], path: Path, *, title: str, window: int
) -> Path:
    """One row per group of variants: training loss (moving average over ``window`` steps) and validation
    accuracy against the step, mean over seeds with a ± 1 std band, one colour per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 0.4 + 3.9 * len(groups)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(groups), 2, squeeze=False)
    for (group, variants), (ax_loss, ax_acc) in zip(groups.items(), axes, strict=True):
        for colour, name in enumerate(variants):
            done = [run for run in runs if run["variant"] == name and not run["note"]]
            if not done:
                continue
            label = f"{name} ({len(done)} seed{'s' * (len(done) > 1)})"
            losses = _smooth(np.array([run["loss"] for run in done]), window)
            _band(ax_loss, np.arange(1, losses.shape[1] + 1), losses, f"C{colour}", label)
            accuracies = np.array([run["val_acc"] for run in done])
            _band(ax_acc, np.array(done[0]["val_steps"]), accuracies, f"C{colour}", label, marker="o")
        prefix = f"{group}: " if group else ""
        ax_loss.set(
            xlabel="step",
            ylabel=f"training loss ({window}-step moving average)",
            yscale="log",
            title=f"{prefix}training loss",
        )
        ax_acc.set(xlabel="step", ylabel="validation top-1 accuracy", title=f"{prefix}validation accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(True, which="both", alpha=0.25)
            ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    return path


def _band(ax, x: np.ndarray, values: np.ndarray, colour: str, label: str, marker: str | None = None) -> None:
    mean = values.mean(axis=0)
    ax.plot(x, mean, color=colour, label=label, marker=marker, markersize=3, linewidth=1.2)
    if len(values) > 1:
        std = values.std(axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)


def report(
    out: Path,
    stem: str,
    runs: Sequence[dict],
    summary: Sequence[dict],
    payload: dict,
    *,
    groups: dict[str, Sequence[str]],
    title: str,
    skipped: Sequence[str],
    time_budget: float,
) -> dict:
    """Write the runs and summary (CSV, JSON with curves) and the curves plot; print the summary table.

    Returns the JSON payload with the tables, as the training scripts' ``main`` does.
    """
    tables = {"runs": [{key: run[key] for key in RUN_COLUMNS} for run in runs], "summary": list(summary)}
    write_results(out, stem, tables, {**payload, "curves": list(runs)})
    plot_curves(runs, groups, out / f"{stem}_curves.png", window=10, title=title)
    print(format_table(summary, SUMMARY_COLUMNS))
    if skipped:
        print(f"time budget of {time_budget:.0f} s spent; not run: {', '.join(skipped)}")
    print(f"total {payload['total_time_s']:.0f} s; wrote {stem}_* into {Path(out)}")
    return {**payload, **tables}
