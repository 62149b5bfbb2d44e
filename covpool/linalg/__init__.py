"""Differentiable matrix square roots and inverse square roots of batches of SPD matrices."""

from covpool.linalg.roots import METHODS, inv_sqrtm, sqrtm

__all__ = ["METHODS", "inv_sqrtm", "sqrtm"]
