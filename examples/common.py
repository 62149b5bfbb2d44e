"""Command-line pieces shared by the examples: trainer options and the Lightning ``Trainer`` they build,
and the run options, environment record and result files of the paper-comparison scripts."""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from covpool.bench.report import write_csv, write_json


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the script docstring's layout and shows every default but ``None`` (which the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


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


# The paper-comparison scripts (paper_*.py): their run options, environment record and result files.

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where the paper-comparison scripts write by default: ``examples/results``."""


def parse_device(text: str) -> torch.device:
    """``--device`` value: a torch device that exists here (``cuda`` only when CUDA is available)."""
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {text!r} given but torch.cuda.is_available() is False")
    return device


def add_run_arguments(parser: argparse.ArgumentParser, *, time_budget: float) -> None:
    """Add ``--quick``, ``--out``, ``--device``, ``--time-budget``, ``--threads`` and ``--no-progress``."""
    group = parser.add_argument_group("run")
    group.add_argument(
        "--quick", action="store_true", help="tiny settings that run in seconds: a smoke test, not results"
    )
    group.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the CSV, JSON and PNG files")
    group.add_argument(
        "--device",
        type=parse_device,
        default=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        help="cpu, cuda, cuda:1, ... (cuda when available)",
    )
    group.add_argument(
        "--time-budget", type=float, default=time_budget, help="seconds after which nothing new is started"
    )
    group.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def apply_run_arguments(args: argparse.Namespace) -> None:
    """Set the torch CPU threads from ``--threads`` (left as they are when not given)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command behind a result file: ``python <script>`` and its arguments (``sys.argv`` if None)."""
    return " ".join([f"python {script}", *(argv if argv is not None else sys.argv[1:])])


def environment(device: torch.device) -> dict[str, object]:
    """Where the figures were measured: versions, CPU threads and the device's name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_results(out: Path, stem: str, tables: dict[str, list[dict]], payload: dict) -> list[Path]:
    """Write ``<stem>_<table>.csv`` per table and ``<stem>.json`` (``payload`` and the tables) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in tables.items():
        paths.append(out / f"{stem}_{name}.csv")
        write_csv(rows, paths[-1])
    paths.append(out / f"{stem}.json")
    write_json({**payload, **tables}, paths[-1])
    return paths


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; NaN for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan
