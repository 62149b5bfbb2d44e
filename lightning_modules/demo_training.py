"""The training behind ``covpool-demo`` (:mod:`lightning_modules.finetune_demo`, its command line and
what it runs): both models, their figures and ``results.json``."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_modules.callbacks import TrainingHistory
from lightning_modules.classifier import CovPoolClassifier
from lightning_modules.data import DigitsDataModule
from lightning_modules.finetune_demo import MODELS


def train_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train and test one model; returns its figures and curves."""
    L.seed_everything(args.seed, workers=True, verbose=False)
    spec = MODELS[name]
    head_kwargs = {"reduction_dim": args.reduction_dim} if "isqrtcov" in name else {}
    model = CovPoolClassifier(
        spec["model"],
        num_classes=DigitsDataModule.num_classes,
        model_kwargs={**spec["model_kwargs"], **head_kwargs},
        pretrained=args.weights is not None,
        pretrained_cfg_overlay={"file": str(args.weights)} if args.weights is not None else None,
        lr=args.lr,
        head_lr=args.head_lr,
        warmup_epochs=0.5,
        label_smoothing=0.1,
    )
    data = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size, seed=args.seed)
    history = TrainingHistory(monitor=("val/loss", "val/acc1"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.max_epochs,
        fast_dev_run=args.fast_dev_run or False,
        val_check_interval=0.5,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[history],
    )
    print(f"\n== {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    times = history.step_times[1:] or history.step_times  # the first step pays one-off set-up costs
    return {
        "val_acc1": history.validations[-1][1]["val/acc1"],
        "test_acc1": test["test/acc1"],
        "test_acc5": test["test/acc5"],
        "time_per_step_s": sum(times) / len(times),
        "steps": trainer.global_step,
        "fit_time_s": fit_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_loss": history.steps,
        "val": [(step, values) for step, values in history.validations],
    }


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else what :func:`platform.processor` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plot_curves(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Training loss and validation top-1 accuracy against the step, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, result in results.items():
        steps, losses = zip(*result["train_loss"], strict=True)
        ax_loss.plot(steps, losses, label=name, alpha=0.8)
        val_steps = [step for step, _ in result["val"]]
        ax_acc.plot(val_steps, [values["val/acc1"] for _, values in result["val"]], marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="Validation accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train both models, write ``results.json`` and ``curves.png``; returns the results."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {name: train_one(name, args) for name in MODELS}
    summary = {
        "config": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "cpu": cpu_name(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "total_time_s": time.perf_counter() - start,
        "models": results,
    }
    (args.output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    plot_curves(results, args.output_dir / "curves.png")
    print(f"\n{'model':<20} {'val top-1':>10} {'test top-1':>11} {'s/step':>8} {'steps':>6}")
    for name, r in results.items():
        print(
            f"{name:<20} {r['val_acc1']:>10.4f} {r['test_acc1']:>11.4f} "
            f"{r['time_per_step_s']:>8.3f} {r['steps']:>6}"
        )
    print(f"total {summary['total_time_s']:.1f} s; wrote {args.output_dir / 'results.json'} and curves.png")
    return summary
