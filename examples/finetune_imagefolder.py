"""Fine-tune a timm model on your own images with its classifier swapped for a covariance head.

:func:`covpool.attach_head` keeps every backbone weight of the timm model and replaces global pooling +
classifier with an iSQRT-COV head (CNNs, ViTs) or a So-ViT head (ViTs, ``--head sovit``). The new head
trains with a larger learning rate (``--head-lr``) than the backbone (``--lr``). Images come from class
folders (``root/train/<class>/*.png`` and ``root/val/<class>/*.png``, or one ``root/<class>/`` tree that
is split), normalised with the model's own mean and std.

Pretrained backbone weights are read from a local file (timm's ``pretrained_cfg_overlay=dict(file=...)``),
e.g. a ``resnet50.pth`` state dict saved on a machine with internet access by
``torch.save(timm.create_model("resnet50", pretrained=True).state_dict(), "resnet50.pth")``.

    python examples/finetune_imagefolder.py path/to/images --model resnet50 --weights resnet50.pth
    python examples/finetune_imagefolder.py path/to/images --model vit_small_patch16_224 --head sovit
    python examples/finetune_imagefolder.py path/to/images --fast-dev-run --image-size 64
"""

from __future__ import annotations

import argparse
import sys

import lightning as L
import timm
from common import add_trainer_arguments, make_parser, make_trainer
from timm.data import resolve_model_data_config

import covpool
from lightning_modules import CovPoolClassifier, ImageFolderDataModule


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("root", help="image folder: train/ and val/ class folders, or class folders")
    parser.add_argument("--model", default="resnet18", help="timm model name")
    parser.add_argument(
        "--weights", default=None, help="local backbone checkpoint (state dict) to start from"
    )
    parser.add_argument("--head", choices=covpool.models.HEADS, default="isqrtcov", help="covariance head")
    parser.add_argument(
        "--reduction-dim", type=int, default=None, help="head reduction (None: the head's default)"
    )
    parser.add_argument("--image-size", type=int, default=224, help="side of the training crops")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="data loader processes (default: the CPUs, at most 4)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="backbone learning rate")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="head learning rate")
    add_trainer_arguments(parser, epochs=20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> L.Trainer:
    """Fine-tune and test; returns the trainer (``trainer.lightning_module`` is the classifier)."""
    args = parse_args(argv)
    trainer = make_trainer(args)
    overlay = dict(file=args.weights) if args.weights else None
    backbone = timm.create_model(args.model, pretrained=overlay is not None, pretrained_cfg_overlay=overlay)
    config = resolve_model_data_config(backbone)
    data = ImageFolderDataModule(
        args.root,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        image_size=args.image_size,
        mean=config["mean"],
        std=config["std"],
    )
    head_kwargs = {} if args.reduction_dim is None else dict(reduction_dim=args.reduction_dim)
    model = covpool.attach_head(backbone, head=args.head, num_classes=data.num_classes, **head_kwargs)
    classifier = CovPoolClassifier(
        model,
        num_classes=data.num_classes,
        optimizer="sgd",
        lr=args.lr,
        head_lr=args.head_lr,
        weight_decay=1e-4,
    )
    trainer.fit(classifier, datamodule=data)
    trainer.test(classifier, datamodule=data)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
