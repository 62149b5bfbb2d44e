"""ZCA batch norm in a ResNet on CIFAR-10: the first BatchNorm of the network whitens its channels.

The setting of the paper's Table 3: a ResNet whose first BatchNorm (after the stem convolution) is replaced
by ZCA whitening over groups of channels (:func:`covpool.convert_zca_batchnorm`, ``--zca first``); ``--zca
none`` trains the plain BatchNorm baseline and ``--zca all`` converts every BatchNorm. The timm ResNet gets
the usual CIFAR stem (3x3 stride-1 convolution, no max pooling), so 32 px images keep a 4x4 final map.

CIFAR-10 comes through torchvision: ``--data-dir`` must hold ``cifar-10-batches-py`` or ``--download`` it
(needs internet). ``--synthetic`` trains on generated CIFAR-shaped images instead (class templates plus
noise), which is only meant for smoke tests; the run says so loudly.

    python examples/zca_resnet_cifar.py --data-dir data --download --epochs 200
    python examples/zca_resnet_cifar.py --zca none --data-dir data            # BatchNorm baseline
    python examples/zca_resnet_cifar.py --synthetic --fast-dev-run            # smoke test, no data needed
"""

from __future__ import annotations

import argparse
import sys
import warnings

import lightning as L
import timm
import torch
from common import add_trainer_arguments, make_parser, make_trainer
from torch import nn
from torch.utils.data import TensorDataset

from lightning_modules import CIFARDataModule, CovPoolClassifier

NUM_CLASSES = 10


def cifar_resnet(name: str, num_classes: int) -> nn.Module:
    """A timm ResNet with a CIFAR stem: 3x3 stride-1 first convolution and no max pooling."""
    net = timm.create_model(name, num_classes=num_classes)
    if not isinstance(net.conv1, nn.Conv2d):
        raise ValueError(f"--model must be a timm ResNet with a single-convolution stem, got {name!r}")
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def synthetic_cifar(num_samples: int, *, batch_size: int, seed: int) -> L.LightningDataModule:
    """CIFAR-shaped stand-in data: one smooth random template per class plus noise (for smoke tests only)."""
    generator = torch.Generator().manual_seed(seed)
    templates = nn.functional.interpolate(
        torch.randn(NUM_CLASSES, 3, 4, 4, generator=generator), size=32, mode="bilinear"
    )
    labels = torch.arange(num_samples) % NUM_CLASSES
    images = templates[labels] + 0.5 * torch.randn(num_samples, 3, 32, 32, generator=generator)
    split = int(0.8 * num_samples)
    train = TensorDataset(images[:split], labels[:split])
    val = TensorDataset(images[split:], labels[split:])
    return L.LightningDataModule.from_datasets(train, val, val, batch_size=batch_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data", help="folder of cifar-10-batches-py")
    data.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir (internet)")
    data.add_argument("--synthetic", action="store_true", help="generated stand-in data, for smoke tests")
    data.add_argument("--batch-size", type=int, default=128, help="images per batch")
    data.add_argument(
        "--num-workers", type=int, default=None, help="data loader processes (default: the CPUs, at most 4)"
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet18", help="timm ResNet name")
    model.add_argument(
        "--zca", choices=("first", "all", "none"), default="first", help="BatchNorms that become ZCA"
    )
    model.add_argument("--group-size", type=int, default=16, help="ZCA channel group")
    model.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    add_trainer_arguments(parser, epochs=200)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> L.Trainer:
    """Train and test; returns the trainer (``trainer.lightning_module`` is the classifier)."""
    args = parse_args(argv)
    trainer = make_trainer(args)
    if args.synthetic:
        warnings.warn("--synthetic: training on GENERATED data, not CIFAR-10", stacklevel=1)
        data = synthetic_cifar(256, batch_size=args.batch_size, seed=args.seed)
    else:
        data = CIFARDataModule(
            args.data_dir,
            variant=10,
            download=args.download,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
        )
    classifier = CovPoolClassifier(
        cifar_resnet(args.model, NUM_CLASSES),
        num_classes=NUM_CLASSES,
        zca=None if args.zca == "none" else args.zca,
        zca_kwargs=dict(group_size=args.group_size),
        optimizer="sgd",
        lr=args.lr,
        weight_decay=5e-4,
    )
    print(f"first norm layer: {type(classifier.model.bn1).__name__}")
    trainer.fit(classifier, datamodule=data)
    trainer.test(classifier, datamodule=data)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
