"""Second-order layers: ZCA batch norm, covariance-pooling heads, BatchNorm conversion, and the
recalibration of ZCA running statistics."""

from covpool.layers.convert import convert_zca_batchnorm
from covpool.layers.covpool_head import CovPoolHead
from covpool.layers.recalibrate import recalibrate_statistics
from covpool.layers.token_head import SecondOrderTokenHead
from covpool.layers.zca_batchnorm import ZCABatchNorm1d, ZCABatchNorm2d

__all__ = [
    "CovPoolHead",
    "SecondOrderTokenHead",
    "ZCABatchNorm1d",
    "ZCABatchNorm2d",
    "convert_zca_batchnorm",
    "recalibrate_statistics",
]
