"""Lightning integration of covpool: classifier, data modules, spectrum and flagged-matrix monitors, ZCA
recalibration, CLI and demo.

The names below are imported on first use (``from lightning_modules import CovPoolClassifier`` works as
usual), so that the command lines' ``--help`` answers without importing Lightning and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names for type checkers and the API reference; at run time __getattr__ loads them
    from lightning_modules.callbacks import CovarianceSpectrumMonitor as CovarianceSpectrumMonitor
    from lightning_modules.callbacks import FlaggedMatrixMonitor as FlaggedMatrixMonitor
    from lightning_modules.callbacks import TrainingHistory as TrainingHistory
    from lightning_modules.callbacks import ZCARecalibration as ZCARecalibration
    from lightning_modules.classifier import CovPoolClassifier as CovPoolClassifier
    from lightning_modules.data import CIFARDataModule as CIFARDataModule
    from lightning_modules.data import DigitsDataModule as DigitsDataModule
    from lightning_modules.data import ImageFolderDataModule as ImageFolderDataModule

_HOMES: dict[str, str] = {
    "CIFARDataModule": "lightning_modules.data",
    "CovPoolClassifier": "lightning_modules.classifier",
    "CovarianceSpectrumMonitor": "lightning_modules.callbacks",
    "DigitsDataModule": "lightning_modules.data",
    "FlaggedMatrixMonitor": "lightning_modules.callbacks",
    "ImageFolderDataModule": "lightning_modules.data",
    "TrainingHistory": "lightning_modules.callbacks",
    "ZCARecalibration": "lightning_modules.callbacks",
}
"""The module that defines each public name."""

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the ones not loaded yet included."""
    return sorted([*globals(), *_HOMES])
