"""``covpool-demo``: ResNet-18 with iSQRT-COV pooling against the same ResNet-18 with average pooling.

Both train on scikit-learn's embedded digits (no download), upsampled to 48 px, for 5 epochs on the
CPU, from scratch (or from a timm ResNet-18 weight file given with ``--weights``). Both backbones use
``output_stride=16`` (timm's dilated last stage, as the iSQRT-COV paper removes the last downsampling),
so they differ only in the head: global average pooling + linear against a 1×1 reduction to
``--reduction-dim`` channels, the square root of their covariance over the 3×3 positions and a linear
layer on its upper triangle. The run prints the final validation and test top-1 accuracy and the time
per training step of each, and writes ``curves.png`` (training loss and validation accuracy against the
step) and ``results.json`` (with the CPU, torch version and thread count) into ``--output-dir``.

The defaults are sized to take a few minutes on 2 idle CPU cores (other processes on the same cores
slow it by as much as they take); the last stage of ResNet-18 at 3×3
positions is most of the cost, which grows with the square of ``--image-size``.

Example::

    covpool-demo                      # about 3 minutes of training on 2 idle CPU cores; longer on busy ones
    covpool-demo --fast-dev-run       # a few seconds: one batch of each stage
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    "resnet18_isqrtcov": {"model": "resnet18_isqrtcov", "model_kwargs": {"output_stride": 16}},
    "resnet18_avgpool": {"model": "resnet18", "model_kwargs": {"output_stride": 16}},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``covpool-demo``; exits with status 2 on bad arguments (argparse's)."""
    parser = argparse.ArgumentParser(
        prog="covpool-demo",
        description="Train ResNet-18 with iSQRT-COV pooling and with average pooling on the embedded digits "
        "(from scratch, or fine-tuned from --weights); print accuracy and time per step, write curves.png "
        "and results.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--max-epochs", type=int, default=5, help="training epochs per model")
    parser.add_argument(
        "--fast-dev-run",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="run N batches (1 when N is left out) of each stage only, a smoke test of a few seconds; "
        "0 trains in full",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="where results go")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, split and shuffling")
    parser.add_argument("--image-size", type=int, default=48, help="side of the upsampled digits, px")
    parser.add_argument("--batch-size", type=int, default=64, help="training and evaluation batch size")
    parser.add_argument("--reduction-dim", type=int, default=64, help="channels of the covariance")
    parser.add_argument("--lr", type=float, default=0.05, help="backbone learning rate (SGD)")
    parser.add_argument("--head-lr", type=float, default=None, help="head learning rate; --lr when not given")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="timm resnet18 weight file to fine-tune from; trains from scratch when not given",
    )
    args = parser.parse_args(argv)
    if args.max_epochs < 1:
        parser.error(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if args.fast_dev_run < 0:
        parser.error(f"--fast-dev-run must be >= 0, got {args.fast_dev_run}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``covpool-demo``."""
    args = parse_args(argv)
    # imported here: the training imports Lightning and torch, which parsing (and --help) does not need
    from lightning_modules.demo_training import run

    run(args)


if __name__ == "__main__":
    main()
