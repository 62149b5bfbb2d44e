"""Lightning data modules: embedded digits (default), users' class folders, CIFAR-10/100."""

from lightning_modules.data.base import ClassificationDataModule, default_num_workers, stratified_split
from lightning_modules.data.cifar import CIFARDataModule
from lightning_modules.data.digits import DigitsDataModule, digits_tensors
from lightning_modules.data.image_folder import ImageFolderDataModule

__all__ = [
    "CIFARDataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "default_num_workers",
    "digits_tensors",
    "stratified_split",
]
