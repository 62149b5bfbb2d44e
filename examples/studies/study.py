"""What the studies share: their command line, the results files they write, and the float32 mtp plan's
normalised input that several of them start from.

Each study in this folder is a script (``python examples/studies/<name>.py --help``) that writes
``<name>.csv`` (its rows) and ``<name>.json`` (the rows, its other tables, the command, settings and
environment) under ``--out``, by default ``examples/results/``, where its recorded results are kept.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

import covpool
from covpool.bench.report import record, write_csv, write_json
from covpool.linalg.normalization import normalise
from covpool.linalg.planner import RootPlan, plan_root
from covpool.numerics import with_relative_ridge

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
"""Where the studies write by default, beside the paper comparisons' results: ``examples/results``."""


def make_parser(description: str, *, sizes: Sequence[int]) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows ``description`` (the study's docstring), with ``--sizes`` (default
    ``sizes``), ``--out``, ``--seed``, ``--threads`` and ``--no-progress``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(sizes),
        metavar="N",
        help=f"matrix sizes n (default {' '.join(map(str, sizes))})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        metavar="DIR",
        help="folder of the results (default examples/results)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``argv`` parsed; torch's CPU threads set from ``--threads``, the ``--out`` folder made."""
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def write_rows(args: argparse.Namespace, name: str, rows: list[dict], **tables: list[dict]) -> list[Path]:
    """``rows`` as ``<name>.csv`` and, with ``tables`` and the run's record (command, settings, environment),
    ``<name>.json`` under ``--out``; prints and returns both paths."""
    paths = [args.out / f"{name}.csv", args.out / f"{name}.json"]
    write_csv(rows, paths[0])
    write_json({**record(args), "rows": rows, **tables}, paths[1])
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


def mtp_plan(n: int, *, eps: float = 0.0, **options: object) -> RootPlan:
    """The plan of ``RootOptions(method="mtp", **options)`` for float32 ``n × n`` input ridged by ``eps``, on
    CPU."""
    return plan_root(
        covpool.RootOptions(method="mtp", **options),
        n,
        eps=eps,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def normalised(A: torch.Tensor, *, eps: float = 0.0, **options: object) -> tuple[torch.Tensor, RootPlan]:
    """``(Â, plan)``: ``A`` in float32, ridged by ``eps`` and normalised as :func:`mtp_plan` normalises it,
    and that plan. Shape of ``Â``: that of ``A``."""
    plan = mtp_plan(A.shape[-1], eps=eps, **options)
    A_hat, _ = normalise(with_relative_ridge(A.float(), eps), plan.normalization)
    return A_hat, plan
