"""Lightning integration of covpool: classifier, data modules, spectrum and flagged-matrix monitors, ZCA
recalibration, CLI and demo."""

from lightning_modules.callbacks import (
    CovarianceSpectrumMonitor,
    FlaggedMatrixMonitor,
    TrainingHistory,
    ZCARecalibration,
)
from lightning_modules.classifier import CovPoolClassifier
from lightning_modules.data import CIFARDataModule, DigitsDataModule, ImageFolderDataModule

__all__ = [
    "CIFARDataModule",
    "CovPoolClassifier",
    "CovarianceSpectrumMonitor",
    "DigitsDataModule",
    "FlaggedMatrixMonitor",
    "ImageFolderDataModule",
    "TrainingHistory",
    "ZCARecalibration",
]
