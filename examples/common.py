"""Command-line pieces shared by the examples: trainer options and the Lightning ``Trainer`` they build."""

from __future__ import annotations

import argparse

import lightning as L


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the script docstring's layout and shows every default."""


def make_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows ``description`` (the script docstring) and the defaults."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_trainer_arguments(parser: argparse.ArgumentParser, *, epochs: int) -> None:
    """Add ``--epochs``, ``--accelerator``, ``--devices``, ``--precision``, ``--seed``, ``--output-dir`` and
    ``--fast-dev-run`` (one training and one validation batch, no logs or checkpoints: a smoke test)."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    group.add_argument("--accelerator", default="auto", help="cpu, gpu, ...")
    group.add_argument("--devices", default="auto", help="devices to use")
    group.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument("--output-dir", default="runs", help="logs and checkpoints")
    group.add_argument("--fast-dev-run", action="store_true", help="run one batch of each stage and stop")


def make_trainer(args: argparse.Namespace, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """A ``Trainer`` from the options of :func:`add_trainer_arguments` (seeds everything first)."""
    L.seed_everything(args.seed, workers=True)
    return L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        default_root_dir=args.output_dir,
        fast_dev_run=args.fast_dev_run,
        enable_progress_bar=not args.fast_dev_run,
        enable_model_summary=not args.fast_dev_run,
        callbacks=callbacks,
    )
