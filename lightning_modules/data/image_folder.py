"""Users' own images in class folders (torchvision ``ImageFolder``) with timm's train/eval transforms.

Layout: ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (and optionally ``root/test``), or a
single ``root/<class>/*.png`` tree that is split with a seed. Training images get timm's
RandomResizedCrop + horizontal flip + colour jitter, evaluation images a resize and centre crop; both
are normalised with ``mean``/``std`` (ImageNet's by default, as pretrained timm models expect).
"""

from __future__ import annotations

from pathlib import Path

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from lightning_modules.data.base import ClassificationDataModule, stratified_split


class ImageFolderDataModule(ClassificationDataModule):
    """Class-folder images with timm-style transforms; a seeded split when there is no ``val/`` folder.

    Args:
        root: folder with ``train/`` and ``val/`` (optionally ``test/``) class folders, or class folders.
        batch_size: samples per batch.
        num_workers: loader worker processes; ``None``: the CPUs this process may use, at most 4.
        image_size: side of the crops the model sees.
        val_fraction: fraction of the training images held out when there is no ``val/`` folder.
        seed: seed of that split.
        crop_pct: evaluation centre crop as a fraction of the resized image (timm's ``crop_pct``).
        color_jitter: strength of the training colour jitter (0 disables it).
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.

    Without ``test/``, the test split is the validation split.

    Shape:
        - batches: images (batch_size, 3, image_size, image_size), labels (batch_size,)

    Example:
        >>> dm = ImageFolderDataModule("data/my_images", image_size=224)  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int = 224,
        val_fraction: float = 0.1,
        seed: int = 0,
        crop_pct: float = 0.875,
        color_jitter: float = 0.4,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, seed=seed)
        self.save_hyperparameters()
        self.root = Path(root)
        train_dir = self.root / "train"
        self.train_dir = train_dir if train_dir.is_dir() else self.root
        if not self.train_dir.is_dir():
            raise FileNotFoundError(f"`root` must be a folder of class folders, got {str(self.root)!r}")
        self.classes, _ = find_classes(str(self.train_dir))
        self.num_classes = len(self.classes)
        self.val_fraction = val_fraction
        self.train_transform = create_transform(
            image_size, is_training=True, color_jitter=color_jitter, mean=mean, std=std
        )
        self.eval_transform = create_transform(
            image_size, is_training=False, crop_pct=crop_pct, mean=mean, std=std
        )

    def _folder(self, name: str) -> Path | None:
        path = self.root / name
        return path if self.train_dir != self.root and path.is_dir() else None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_dir, val_dir, test_dir = self.train_dir, self._folder("val"), self._folder("test")
        if val_dir is not None:
            self.train_set = ImageFolder(train_dir, transform=self.train_transform)
            self.val_set = ImageFolder(val_dir, transform=self.eval_transform)
            self._check_classes(self.val_set, val_dir)
        else:
            train_view = ImageFolder(train_dir, transform=self.train_transform)
            eval_view = ImageFolder(train_dir, transform=self.eval_transform)
            train, val = stratified_split(train_view.targets, [self.val_fraction], seed=self.seed)
            self.train_set, self.val_set = Subset(train_view, train.tolist()), Subset(eval_view, val.tolist())
        if test_dir is not None:
            self.test_set = ImageFolder(test_dir, transform=self.eval_transform)
            self._check_classes(self.test_set, test_dir)
        else:
            self.test_set = self.val_set

    def _check_classes(self, dataset: ImageFolder, folder: Path) -> None:
        if dataset.classes != self.classes:
            raise ValueError(
                f"class folders of {str(folder)!r} must match those of {str(self.train_dir)!r}: "
                f"got {dataset.classes}, expected {self.classes}"
            )
