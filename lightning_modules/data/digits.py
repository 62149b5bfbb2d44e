"""The default data: scikit-learn's handwritten digits, read from the file shipped inside scikit-learn.

1,797 grey 8×8 images of the digits 0–9 (UCI "Optical Recognition of Handwritten Digits"); nothing is
downloaded. Images are scaled to [0, 1], upsampled (bilinear) to ``image_size`` and standardised with the
mean and standard deviation of the training split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_modules.data.base import ClassificationDataModule, stratified_split


def digits_tensors(*, image_size: int, in_chans: int) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as float images in [0, 1] and their labels.

    Shape:
        - output: images (1797, in_chans, image_size, image_size), labels (1797,)

    Example:
        >>> x, y = digits_tensors(image_size=16, in_chans=3)
        >>> x.shape, y.shape, int(y.max())
        (torch.Size([1797, 3, 16, 16]), torch.Size([1797]), 9)
    """
    if in_chans not in (1, 3):
        raise ValueError(f"`in_chans` must be 1 or 3, got {in_chans}")
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    images = F.interpolate(
        images[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    images = repeat(images.clamp(0, 1), "n 1 h w -> n c h w", c=in_chans).contiguous()
    return images, torch.as_tensor(digits.target, dtype=torch.long)


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's 8×8 digits (10 classes) upsampled to ``image_size``; stratified seeded splits.

    Args:
        batch_size: samples per batch.
        num_workers: loader workers (0 is fastest: the whole set is one small tensor).
        image_size: side of the upsampled images. The default 64 gives a ResNet's stride-32 feature map
            2×2 positions, the fewest a covariance head accepts (32 px would give 1×1).
        in_chans: 1 (grey) or 3 (grey repeated, for ImageNet-style backbones).
        val_fraction: fraction of the images in the validation split.
        test_fraction: fraction of the images in the test split.
        seed: seed of the split.

    Shape:
        - batches: images (batch_size, in_chans, image_size, image_size), labels (batch_size,)

    Example:
        >>> dm = DigitsDataModule(batch_size=8, image_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape
        (torch.Size([8, 3, 16, 16]), torch.Size([8]))
    """

    num_classes = 10

    def __init__(
        self,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 64,
        in_chans: int = 3,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, seed=seed)
        self.save_hyperparameters()
        self.in_chans = in_chans
        self.fractions = (val_fraction, test_fraction)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = digits_tensors(image_size=self.image_size, in_chans=self.in_chans)
        train, val, test = stratified_split(labels.tolist(), self.fractions, seed=self.seed)
        mean, std = images[train].mean(), images[train].std()
        images = (images - mean) / std
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(images[idx], labels[idx]) for idx in (train, val, test)
        )
