"""covpool: second-order (covariance) layers for vision models, on a fast differentiable matrix root."""

from covpool import testing
from covpool.export import export_onnx
from covpool.layers import (
    CovPoolHead,
    SecondOrderTokenHead,
    ZCABatchNorm1d,
    ZCABatchNorm2d,
    convert_zca_batchnorm,
    recalibrate_statistics,
)
from covpool.linalg import METHODS, PAPER_CONFIG, RootOptions, flagged_matrices, inv_sqrtm, sqrtm
from covpool.models import attach_head  # registers the timm models

__all__ = [
    "CovPoolHead",
    "METHODS",
    "PAPER_CONFIG",
    "RootOptions",
    "SecondOrderTokenHead",
    "ZCABatchNorm1d",
    "ZCABatchNorm2d",
    "attach_head",
    "convert_zca_batchnorm",
    "export_onnx",
    "flagged_matrices",
    "inv_sqrtm",
    "recalibrate_statistics",
    "sqrtm",
    "testing",
]
__version__ = "0.1.0"
