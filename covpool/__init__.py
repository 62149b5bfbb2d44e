"""covpool: second-order (covariance) layers for vision models, on a fast differentiable matrix root."""

from covpool.linalg import METHODS, inv_sqrtm, sqrtm

__all__ = ["METHODS", "inv_sqrtm", "sqrtm"]
__version__ = "0.1.0"
