"""CIFAR-10 / CIFAR-100 through torchvision, with the usual crop-and-flip augmentation.

``download=True`` fetches the archive from www.cs.toronto.edu and needs internet access (once, in
``prepare_data``); otherwise ``root`` must already hold ``cifar-10-batches-py`` or ``cifar-100-python``.
The official test set is the test split; the validation split is held out of the training set with a seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100

from lightning_modules.data.base import ClassificationDataModule, stratified_split

CIFAR_MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10 or CIFAR-100 (torchvision's on-disk format) with a seeded validation split.

    Args:
        root: folder that holds (or will hold, with ``download=True``) the extracted CIFAR batches.
        variant: 10 or 100.
        download: download the archive if missing (needs internet).
        batch_size: samples per batch.
        num_workers: loader worker processes; ``None``: the CPUs this process may use, at most 4.
        image_size: side of the images the model sees (CIFAR is 32; other sizes resize bilinearly).
        val_fraction: fraction of the training set held out for validation.
        seed: seed of that split.

    Shape:
        - batches: images (batch_size, 3, image_size, image_size), labels (batch_size,)

    Example:
        >>> dm = CIFARDataModule("data", variant=10, download=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path = "data",
        *,
        variant: Literal[10, 100] = 10,
        download: bool = False,
        batch_size: int = 128,
        num_workers: int | None = None,
        image_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, seed=seed)
        if variant not in (10, 100):
            raise ValueError(f"`variant` must be 10 or 100, got {variant!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.variant = variant
        self.num_classes = variant
        self.download = download
        self.val_fraction = val_fraction
        resize = [T.Resize(image_size, antialias=True)] if image_size != 32 else []
        finish = [T.ToTensor(), T.Normalize(CIFAR_MEAN[variant], CIFAR_STD[variant])]
        self.train_transform = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *resize, *finish]
        )
        self.eval_transform = T.Compose([*resize, *finish])

    @property
    def dataset_class(self) -> type[CIFAR10]:
        return CIFAR10 if self.variant == 10 else CIFAR100

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self.dataset_class(str(self.root), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_view = self.dataset_class(str(self.root), train=True, transform=self.train_transform)
        eval_view = self.dataset_class(str(self.root), train=True, transform=self.eval_transform)
        train, val = stratified_split(train_view.targets, [self.val_fraction], seed=self.seed)
        self.train_set, self.val_set = Subset(train_view, train.tolist()), Subset(eval_view, val.tolist())
        self.test_set = self.dataset_class(str(self.root), train=False, transform=self.eval_transform)
