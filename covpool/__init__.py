"""covpool: second-order (covariance) layers for vision models, on a fast differentiable matrix root."""

from covpool.linalg import METHODS, PAPER_CONFIG, inv_sqrtm, sqrtm

__all__ = ["METHODS", "PAPER_CONFIG", "inv_sqrtm", "sqrtm"]
__version__ = "0.1.0"
