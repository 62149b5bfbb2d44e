"""The running-statistics lag of ZCA whitening after a short fine-tune, and its remedy.

Trains ``CovPoolClassifier("resnet18", zca="first")`` (the first BatchNorm turned into group ZCA whitening,
group size 16) for one epoch on scikit-learn's digits at 64 px with the recalibration switched off, then
reports test top-1 accuracy of the same weights four ways:

- ``eval, running statistics``: what the model evaluates with after training (running averages);
- ``eval, ZCA recalibrated``: after ``covpool.recalibrate_statistics`` over the training loader;
- ``eval, ZCA + BatchNorm recalibrated``: the same with ``batchnorm=True`` (``update_bn`` for every norm);
- ``train mode (batch statistics)``: every layer normalises with the statistics of its test batch.

It also prints how far the ZCA layer's running covariance is from the covariance of its inputs on the test
images (relative Frobenius distance), before and after recalibration. Offline: the digits ship with
scikit-learn.

    python examples/zca_recalibration.py --threads 1     # 35-40 s on a 2-core CPU (figures: docs/evidence.md)
    python examples/zca_recalibration.py --fast-dev-run  # smoke test: one batch of everything
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import lightning as L
import torch
from common import add_trainer_arguments, make_parser, make_trainer
from einops import rearrange
from torch import Tensor, nn

from covpool import recalibrate_statistics
from covpool.layers.recalibrate import zca_layers
from lightning_modules import CovPoolClassifier, DigitsDataModule


def parse_args(argv: Sequence[str] | None):
    parser = make_parser(__doc__)
    add_trainer_arguments(parser, epochs=1)
    parser.add_argument("--model", default="resnet18", help="timm model name")
    parser.add_argument("--group-size", type=int, default=16, help="channels per ZCA whitening group")
    parser.add_argument("--image-size", type=int, default=64, help="side of the upsampled digits")
    parser.add_argument("--batch-size", type=int, default=64, help="training and test batch size")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument(
        "--max-batches", type=int, default=None, help="recalibration batches (default: the whole train set)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


@torch.no_grad()
def accuracy(model: nn.Module, loader, *, train_mode: bool = False, max_batches: int | None = None) -> float:
    """Top-1 accuracy; ``train_mode`` runs a copy in training mode (batch statistics, buffers of the copy)."""
    model = copy.deepcopy(model).train() if train_mode else model.eval()
    correct = total = 0
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        correct += int((model(images).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


@torch.no_grad()
def covariance_lag(model: nn.Module, loader, *, max_batches: int | None = None) -> float:
    """Relative Frobenius distance of the first ZCA layer's running covariance from the (unbiased) covariance
    of its inputs over ``loader``, the model in eval mode."""
    layer = next(iter(zca_layers(model).values()))
    rows: list[Tensor] = []
    handle = layer.register_forward_pre_hook(
        lambda _m, args: rows.append(rearrange(args[0], "n c h w -> (n h w) c").double())
    )
    accuracy(model, loader, max_batches=max_batches)
    handle.remove()
    groups = rearrange(torch.cat(rows), "m (G g) -> G g m", g=layer.group_size)
    target = torch.stack([torch.cov(group) for group in groups])
    return float(torch.linalg.norm(layer.running_cov.double() - target) / torch.linalg.norm(target))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    L.seed_everything(args.seed, workers=True)
    model = CovPoolClassifier(
        args.model,
        num_classes=DigitsDataModule.num_classes,
        zca="first",
        zca_kwargs={"group_size": args.group_size},
        lr=args.lr,
        recalibrate_zca=False,  # to see the lag; CovPoolClassifier recalibrates by default
    )
    data = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size, seed=args.seed)
    trainer = make_trainer(args)
    trainer.fit(model, datamodule=data)
    train_time = time.perf_counter() - start

    limit = 1 if args.fast_dev_run else None
    recalibration_batches = limit or args.max_batches
    test, train = data.test_dataloader(), data.train_dataloader()
    results = {
        "eval, running statistics": accuracy(model, test, max_batches=limit),
        "train mode (batch statistics)": accuracy(model, test, train_mode=True, max_batches=limit),
    }
    lag = {"before": covariance_lag(model, test, max_batches=limit)}
    with_batchnorm = copy.deepcopy(model)
    recalibrate_statistics(model, train, max_batches=recalibration_batches, progress=False)
    results["eval, ZCA recalibrated"] = accuracy(model, test, max_batches=limit)
    lag["after"] = covariance_lag(model, test, max_batches=limit)
    recalibrate_statistics(
        with_batchnorm, train, max_batches=recalibration_batches, batchnorm=True, progress=False
    )
    results["eval, ZCA + BatchNorm recalibrated"] = accuracy(with_batchnorm, test, max_batches=limit)
    total_time = time.perf_counter() - start

    setting = f"zca='first' (group size {args.group_size}), {args.epochs} epoch(s) at {args.image_size} px"
    print(f"\n{args.model}, {setting}")
    for name, value in results.items():
        print(f"  test top-1, {name:<36} {value:.3f}")
    print(
        "  first ZCA layer: running covariance vs. covariance of its test inputs (relative Frobenius): "
        f"{lag['before']:.1%} before, {lag['after']:.1%} after recalibration"
    )
    print(
        f"  time: training {train_time:.0f} s, total {total_time:.0f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    return {**results, "lag_before": lag["before"], "lag_after": lag["after"], "total_time_s": total_time}


if __name__ == "__main__":
    main()
