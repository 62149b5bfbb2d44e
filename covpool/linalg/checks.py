"""Input validation for the matrix-root functions.

Every check names the argument, what was seen and what was expected, so that a bad call fails at the
call site rather than deep inside a solver.
"""

from __future__ import annotations

import torch

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_square_batch(A: torch.Tensor, name: str = "A") -> None:
    """Validate a batch of real symmetric matrices of shape ``(*, n, n)``.

    Raises:
        TypeError: ``A`` is not a tensor, or its dtype is not a real floating type.
        ValueError: ``A`` has fewer than two dimensions, is not square, or holds NaN/Inf.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (*, n, n), got {type(A).__name__}")
    if A.dtype not in _SUPPORTED:
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64), got {A.dtype}"
        )
    if A.ndim < 2:
        raise ValueError(
            f"{name} must have shape (*, n, n) with at least 2 dimensions, got shape {tuple(A.shape)}"
        )
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"{name} must be square in its last two dimensions (*, n, n), got shape {tuple(A.shape)}"
        )
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"{name} must hold only finite values, found NaN or Inf")


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(value: int, name: str, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
