"""Differentiable matrix square roots and inverse square roots of batches of SPD matrices."""

from covpool.linalg.flags import flagged_matrices
from covpool.linalg.options import METHODS, PAPER_CONFIG, RootOptions
from covpool.linalg.planner import RootPlan, plan_root
from covpool.linalg.roots import inv_sqrtm, sqrtm

__all__ = [
    "METHODS",
    "PAPER_CONFIG",
    "RootOptions",
    "RootPlan",
    "flagged_matrices",
    "inv_sqrtm",
    "plan_root",
    "sqrtm",
]
