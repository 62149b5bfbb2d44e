"""Second-order heads at this machine's scale: a small ResNet with the iSQRT-COV head against the same ResNet
with average pooling, and a tiny ViT with the second-order token head (So-ViT) against its class token,
trained from scratch on scikit-learn's digits (offline), several seeds each.

Song, Sebe & Wang (ICLR 2022) report So-ViT-7 on ImageNet with the covariance root by Newton-Schulz (76.50 %
top-1) and by MPA-Lya (76.84 %); iSQRT-COV (Li et al., CVPR 2018) reports its head against average pooling
on ImageNet. Here the covariance heads take their root from ``ns`` (5 Newton-Schulz steps, autograd backward:
iSQRT-COV's and So-ViT's own) or ``mpa`` (covpool's Padé iteration, Lyapunov backward). The default variants
are the two baselines, ``resnet-isqrtcov-ns`` (iSQRT-COV as published) and both So-ViT roots (the paper's
comparison); ``resnet-isqrtcov-mpa`` is one ``--variants`` away (it adds about 3 minutes).

- ResNet (``resnet-*``): the CIFAR-style ResNet of ``paper_dbn.py`` (widths 16-32-64) without its last
  downsampling (the iSQRT-COV choice), so 16 px digits give 8x8 = 64 positions; ``resnet-avgpool`` pools
  them to a vector, ``resnet-isqrtcov-*`` reduces them to ``--resnet-dim`` channels (1x1 conv, BN, ReLU)
  and classifies the upper triangle of their covariance's square root (:class:`covpool.CovPoolHead`,
  attached with :func:`covpool.attach_head`). SGD with Nesterov momentum.
- ViT (``vit-*``): timm's VisionTransformer with embedding 64, depth 4, 4 heads, 4 px patches of 16 px
  digits (4x4 = 16 visual tokens); ``vit-cls`` classifies the class token, ``vit-sovit-*`` adds the
  square-rooted covariance of the visual tokens reduced to ``--vit-dim`` = 12 dimensions (below 15, the
  rank of a centred 16-token covariance) (:class:`covpool.SecondOrderTokenHead`). AdamW.

Every run sees the same train/validation/test split (1257/270/270 images); the seed sets the initialisation
and the batch order. Writes into ``--out``: ``heads_<device>_runs.csv``, ``heads_<device>_summary.csv``,
``heads_<device>.json`` (with the curves) and ``heads_<device>_curves.png`` (one row of panels per family),
and prints the summary table.

    python examples/paper_heads.py               # 5 variants x 3 seeds: 10-15 minutes on 2 CPU cores
    python examples/paper_heads.py --variants vit-cls vit-sovit-mpa --seeds 0 1 2 3 4
    python examples/paper_heads.py --quick       # a few seconds: a smoke test, not results
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from common import add_run_arguments, apply_run_arguments, command_line, environment, make_parser
from digits_training import (
    SmallResNet,
    TrainSettings,
    Variant,
    load_digits,
    report,
    run_variants,
    summarize,
    tiny_vit,
)
from torch import nn

import covpool

HEAD_ROOTS: dict[str, dict] = {"ns": {"method": "ns"}, "mpa": {"method": "mpa"}}
"""Root name -> the covariance heads' ``root`` options."""

FAMILIES = ("resnet", "vit")
DEFAULT_VARIANTS = ("resnet-avgpool", "resnet-isqrtcov-ns", "vit-cls", "vit-sovit-ns", "vit-sovit-mpa")
VARIANTS = (
    "resnet-avgpool",
    "resnet-isqrtcov-ns",
    "resnet-isqrtcov-mpa",
    "vit-cls",
    "vit-sovit-ns",
    "vit-sovit-mpa",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS), help="variants to train"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per variant")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps per run (19 steps = 1 epoch)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between validations")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--image-size", type=int, default=16, help="side of the upsampled digits")
    resnet = parser.add_argument_group("ResNet")
    resnet.add_argument("--widths", nargs="+", type=int, default=[16, 32, 64], help="channels per stage")
    resnet.add_argument("--resnet-dim", type=int, default=32, help="iSQRT-COV reduction (covariance size)")
    resnet.add_argument("--resnet-lr", type=float, default=0.05, help="peak SGD learning rate")
    vit = parser.add_argument_group("ViT")
    vit.add_argument("--patch-size", type=int, default=4, help="ViT patch side")
    vit.add_argument("--embed-dim", type=int, default=64, help="ViT token width")
    vit.add_argument("--depth", type=int, default=4, help="ViT blocks")
    vit.add_argument("--num-heads", type=int, default=4, help="ViT attention heads")
    vit.add_argument("--vit-dim", type=int, default=12, help="So-ViT token reduction (covariance size)")
    vit.add_argument("--vit-lr", type=float, default=1e-3, help="peak AdamW learning rate")
    add_run_arguments(parser, time_budget=1200.0)
    args = parser.parse_args(argv)
    if args.quick:  # every variant and two seeds, on tinier networks and images (still >= 2x2 positions)
        args.seeds, args.steps, args.eval_every = args.seeds[:2], 4, 2
        args.image_size, args.widths, args.resnet_dim = 8, [8, 8, 16], 8
        args.embed_dim, args.depth, args.num_heads, args.vit_dim = 16, 1, 2, 3
    return args


def builder(variant: str, args: argparse.Namespace) -> Callable[[], nn.Module]:
    """A function that builds the model of ``variant`` (called after seeding)."""
    family, head, *root = variant.split("-")
    if family == "resnet":

        def backbone() -> nn.Module:
            return SmallResNet(widths=args.widths, last_stride=1)

        if head == "avgpool":
            return backbone
        return lambda: covpool.attach_head(
            backbone(), "isqrtcov", reduction_dim=args.resnet_dim, root=HEAD_ROOTS[root[0]]
        )

    def vit() -> nn.Module:
        return tiny_vit(
            image_size=args.image_size,
            patch_size=args.patch_size,
            embed_dim=args.embed_dim,
            depth=args.depth,
            num_heads=args.num_heads,
        )

    if head == "cls":
        return vit
    return lambda: covpool.attach_head(vit(), "sovit", reduction_dim=args.vit_dim, root=HEAD_ROOTS[root[0]])


def pooled_positions(model: nn.Module, image_size: int) -> int:
    """Positions (feature-map cells or visual tokens) that the head of ``model`` pools."""
    with torch.no_grad():
        features = model.eval().forward_features(torch.zeros(2, 1, image_size, image_size))
    if features.ndim == 4:
        return features.shape[2] * features.shape[3]
    return features.shape[1] - getattr(model, "num_prefix_tokens", 1)


def check_positions(args: argparse.Namespace) -> dict[str, int]:
    """Pooled positions per family; a covariance of fewer than 2x2 positions is an error."""
    positions = {}
    for family, variant in zip(FAMILIES, ("resnet-avgpool", "vit-cls"), strict=True):
        positions[family] = count = pooled_positions(builder(variant, args)(), args.image_size)
        if count < 4:
            raise ValueError(
                f"the {family} gives {count} pooled position(s) at --image-size {args.image_size}; the "
                f"covariance heads need at least 2x2 (a covariance of one position is zero)"
            )
    return positions


def main(argv: list[str] | None = None) -> dict:
    """Train every variant with every seed; write and print the results; returns the JSON payload."""
    args = parse_args(argv)
    apply_run_arguments(args)
    start = time.perf_counter()
    positions = check_positions(args)
    data = load_digits(image_size=args.image_size, device=args.device)
    common = {"steps": args.steps, "eval_every": args.eval_every, "batch_size": args.batch_size}
    settings = {
        "resnet": TrainSettings(
            **common,
            optimizer="sgd",
            lr=args.resnet_lr,
            weight_decay=5e-4,
            warmup_steps=min(30, args.steps // 10),
        ),
        "vit": TrainSettings(
            **common,
            optimizer="adamw",
            lr=args.vit_lr,
            weight_decay=0.05,
            warmup_steps=min(60, args.steps // 10),
        ),
    }
    variants = [Variant(name, builder(name, args), settings[name.split("-")[0]]) for name in args.variants]
    runs, skipped = run_variants(
        variants,
        args.seeds,
        data,
        time_budget=args.time_budget,
        progress=not args.no_progress,
        desc="paper_heads",
    )
    summary = summarize(runs, args.variants)
    stem = f"heads_{args.device.type}"
    hyper = {key: value for key, value in vars(args).items() if key not in ("device", "out", "variants")}
    payload = {
        "script": "examples/paper_heads.py",
        "command": command_line("examples/paper_heads.py", argv),
        "environment": environment(args.device),
        "settings": {
            **hyper,
            "train": {family: vars(s) for family, s in settings.items()},
            "head_roots": HEAD_ROOTS,
            "pooled_positions": positions,
        },
        "total_time_s": time.perf_counter() - start,
        "skipped": skipped,
    }
    groups = {family: [name for name in args.variants if name.startswith(family)] for family in FAMILIES}
    return report(
        args.out,
        stem,
        runs,
        summary,
        payload,
        groups={family: names for family, names in groups.items() if names},
        title=f"Second-order heads against first-order pooling, digits ({args.device.type})",
        skipped=skipped,
        time_budget=args.time_budget,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
