"""Lightning integration of covpool: classifier, data modules, spectrum monitor, CLI and demo."""

from lightning_modules.callbacks import CovarianceSpectrumMonitor, TrainingHistory
from lightning_modules.classifier import CovPoolClassifier
from lightning_modules.data import CIFARDataModule, DigitsDataModule, ImageFolderDataModule

__all__ = [
    "CIFARDataModule",
    "CovPoolClassifier",
    "CovarianceSpectrumMonitor",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "TrainingHistory",
]
