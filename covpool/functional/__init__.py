"""Pure functions of covpool's layers: covariance, triu vectorisation, pooling, whitening, all-reduce.

The matrix roots themselves are :func:`covpool.sqrtm` and :func:`covpool.inv_sqrtm`.
"""

from covpool.functional.covariance import covariance, sqrt_covariance_pool, triu_vectorize
from covpool.functional.distributed import all_reduce_sum, is_distributed
from covpool.functional.whitening import (
    group_statistics,
    group_whiten,
    moments_from_statistics,
    whitening_matrix,
)

__all__ = [
    "all_reduce_sum",
    "covariance",
    "group_statistics",
    "group_whiten",
    "is_distributed",
    "moments_from_statistics",
    "sqrt_covariance_pool",
    "triu_vectorize",
    "whitening_matrix",
]
