"""Decorrelated batch norm, the paper's Table 3 setting at this machine's scale: a small ResNet whose FIRST
BatchNorm is replaced by ZCA whitening (covpool.ZCABatchNorm2d), one variant per root method, against the
plain BatchNorm network, trained from scratch on scikit-learn's digits (offline), several seeds each.

Song, Sebe & Wang (ICLR 2022) whiten the first BatchNorm of ResNet-18 on CIFAR-10 and report top-1 test
error: SVD-Padé 4.65, NS 4.57, MPA-Lya 4.39, MTP-Lya 4.49 (%). Here: a CIFAR-style ResNet with one basic
block per stage (widths 16-32-64, about 78k parameters), 16 px digits (upsampled from 8x8), the stem's 16
channels whitened as one group of 16 (``--group-size``), SGD with Nesterov momentum, warm-up and cosine
decay. Variants: ``bn`` (the control), ``eigh`` (exact, as the paper's SVD), ``ns`` (5 Newton-Schulz steps,
autograd backward, as IterNorm), ``mtp`` and ``mpa`` (covpool's defaults, Lyapunov backward). Every run
sees the same train/validation/test split (1257/270/270 images); the seed sets the initialisation and
the batch order.

Writes into ``--out``: ``dbn_<device>_runs.csv`` (one row per run), ``dbn_<device>_summary.csv`` (mean ± std
per variant), ``dbn_<device>.json`` (both, the curves, the settings and the environment) and
``dbn_<device>_curves.png`` (training loss and validation accuracy against the step, mean ± std band over
seeds), and prints the summary table.

    python examples/paper_dbn.py                 # 5 variants x 3 seeds: about 6-10 minutes on 2 CPU cores
    python examples/paper_dbn.py --variants bn mpa --seeds 0 1 2 3 4
    python examples/paper_dbn.py --quick         # a few seconds: a smoke test, not results
"""

from __future__ import annotations

import argparse
import sys
import time

from common import add_run_arguments, apply_run_arguments, command_line, environment, make_parser
from digits_training import (
    SmallResNet,
    TrainSettings,
    Variant,
    load_digits,
    report,
    run_variants,
    summarize,
)
from torch import nn

import covpool

ZCA_VARIANTS: dict[str, dict | None] = {
    "bn": None,
    "eigh": {"method": "eigh"},
    "ns": {"method": "ns"},
    "mtp": {"method": "mtp"},
    "mpa": {"method": "mpa"},
}
"""Variant name -> the ZCA layer's ``root`` options (``None``: plain BatchNorm, the control)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=tuple(ZCA_VARIANTS),
        default=list(ZCA_VARIANTS),
        help="variants to train",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per variant")
    parser.add_argument("--steps", type=int, default=400, help="SGD steps per run (19 steps = 1 epoch)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between validations")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate")
    parser.add_argument("--image-size", type=int, default=16, help="side of the upsampled digits")
    parser.add_argument("--widths", nargs="+", type=int, default=[16, 32, 64], help="channels per stage")
    parser.add_argument("--group-size", type=int, default=16, help="channels whitened together")
    add_run_arguments(parser, time_budget=1200.0)
    args = parser.parse_args(argv)
    if args.quick:  # every variant and two seeds, on a tinier network and images
        args.seeds, args.steps, args.eval_every = args.seeds[:2], 4, 2
        args.image_size, args.widths = 8, [8, 8, 16]
    return args


def build_model(variant: str, args: argparse.Namespace) -> nn.Module:
    """The small ResNet, its first BatchNorm replaced by ZCA whitening unless ``variant`` is ``"bn"``."""
    net = SmallResNet(widths=args.widths)
    root = ZCA_VARIANTS[variant]
    if root is None:
        return net
    return covpool.convert_zca_batchnorm(net, layers="first", group_size=args.group_size, root=root)


def main(argv: list[str] | None = None) -> dict:
    """Train every variant with every seed; write and print the results; returns the JSON payload."""
    args = parse_args(argv)
    apply_run_arguments(args)
    start = time.perf_counter()
    data = load_digits(image_size=args.image_size, device=args.device)
    settings = TrainSettings(
        steps=args.steps,
        eval_every=args.eval_every,
        batch_size=args.batch_size,
        optimizer="sgd",
        lr=args.lr,
        weight_decay=5e-4,
        warmup_steps=min(30, args.steps // 10),
    )
    variants = [Variant(name, lambda name=name: build_model(name, args), settings) for name in args.variants]
    runs, skipped = run_variants(
        variants,
        args.seeds,
        data,
        time_budget=args.time_budget,
        progress=not args.no_progress,
        desc="paper_dbn",
    )
    summary = summarize(runs, args.variants)
    stem = f"dbn_{args.device.type}"
    payload = {
        "script": "examples/paper_dbn.py",
        "command": command_line("examples/paper_dbn.py", argv),
        "environment": environment(args.device),
        "settings": {
            **vars(settings),
            "image_size": args.image_size,
            "widths": args.widths,
            "group_size": args.group_size,
            "zca_variants": ZCA_VARIANTS,
            "quick": args.quick,
        },
        "total_time_s": time.perf_counter() - start,
        "skipped": skipped,
    }
    return report(
        args.out,
        stem,
        runs,
        summary,
        payload,
        groups={"": args.variants},
        title=f"ZCA whitening of the first BatchNorm, small ResNet on digits ({args.device.type})",
        skipped=skipped,
        time_budget=args.time_budget,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
