"""So-ViT on the digits data: a small ViT classified from its class token and second-order visual tokens.

The model is the registered timm model ``vit_tiny_patch16_224_sovit`` (timm's VisionTransformer with
:class:`covpool.SecondOrderTokenHead`), shrunk for 32 px images: 4 px patches give 64 visual tokens, whose
``--reduction-dim``-wide covariance square root is classified together with the class token. The digits
data (scikit-learn's 1797 8x8 images, upscaled) ship with scikit-learn, so this runs offline in minutes
on a CPU. :class:`CovarianceSpectrumMonitor` logs the spectrum of the head's token covariance.

    python examples/sovit_vit.py --epochs 30
    python examples/sovit_vit.py --fast-dev-run
"""

from __future__ import annotations

import argparse
import sys

import lightning as L
from common import add_trainer_arguments, make_parser, make_trainer

from lightning_modules import CovPoolClassifier, DigitsDataModule
from lightning_modules.callbacks import CovarianceSpectrumMonitor


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("--model", default="vit_tiny_patch16_224_sovit", help="registered So-ViT model")
    parser.add_argument("--image-size", type=int, default=32, help="side of the upscaled digits")
    parser.add_argument("--patch-size", type=int, default=4, help="ViT patch side")
    parser.add_argument("--depth", type=int, default=6, help="transformer blocks")
    parser.add_argument("--reduction-dim", type=int, default=32, help="token reduction")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    add_trainer_arguments(parser, epochs=30)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> L.Trainer:
    """Train and test; returns the trainer (``trainer.lightning_module`` is the classifier)."""
    args = parse_args(argv)
    trainer = make_trainer(args, callbacks=[CovarianceSpectrumMonitor(every_n_steps=20)])
    data = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size, in_chans=3)
    classifier = CovPoolClassifier(
        args.model,
        num_classes=data.num_classes,
        model_kwargs=dict(
            img_size=args.image_size,
            patch_size=args.patch_size,
            depth=args.depth,
            reduction_dim=args.reduction_dim,
        ),
        optimizer="adamw",
        lr=args.lr,
        weight_decay=0.05,
        warmup_epochs=min(2, args.epochs / 10),
    )
    trainer.fit(classifier, datamodule=data)
    trainer.test(classifier, datamodule=data)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
