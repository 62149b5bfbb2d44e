"""Lightning integration of covpool: classifier, data modules, spectrum monitor, ZCA recalibration, CLI
and demo."""

from lightning_modules.callbacks import CovarianceSpectrumMonitor, TrainingHistory, ZCARecalibration
from lightning_modules.classifier import CovPoolClassifier
from lightning_modules.data import CIFARDataModule, DigitsDataModule, ImageFolderDataModule

__all__ = [
    "CIFARDataModule",
    "CovPoolClassifier",
    "CovarianceSpectrumMonitor",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "TrainingHistory",
    "ZCARecalibration",
]
