"""What covpool checks, and where.

Three kinds of check, one place:

- **Options** (``method``, ``tol``, ``steps``, a layer's ``eps``, ...) are plain Python values: they are
  validated on the host when :class:`covpool.RootOptions` or a layer is built, on every device, and an
  option the chosen method does not use is an error, never ignored.
- **Tensor metadata** (type, dtype, number of dimensions, squareness) costs nothing to read and is checked on
  every call.
- **Tensor values** (NaN/Inf, a matrix that is not positive (semi-)definite, a spectrum outside the bound a
  schedule was certified for) can only be read on the host after a device synchronisation. Every root
  therefore computes a per-matrix validity flag *inside* the graph and replaces the result of an invalid
  matrix by NaN, which no later computation can hide. Whether the flags are also read on the host, raising
  a :class:`ValueError` that names the batch entries, is ``check_input``: by default yes where reading is
  free (CPU), no on CUDA and while ``torch.compile``/``torch.export`` trace, so that the default GPU path
  never synchronises.

The layers' checks are here too: a BatchNorm momentum, the samples of a rejected batch that hold NaN or
Inf (named in the error), and whether a model defines ``forward`` (the ZCA recalibration and the
Lightning callbacks need a way to run a batch through it).

Every error names the argument, what was seen and what was expected. The layers and the roots take
their checks from here; the count of flagged matrices lives in :mod:`covpool.linalg.flags`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from covpool.numerics import is_tracing

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_square_batch(A: torch.Tensor, name: str = "A") -> None:
    """Validate the metadata of a batch of real matrices of shape ``(*, n, n)`` (no host synchronisation).

    Raises:
        TypeError: ``A`` is not a tensor, or its dtype is not a real floating type.
        ValueError: ``A`` has fewer than two dimensions or is not square.
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


def reads_values(check_input: bool | None, device: torch.device) -> bool:
    """Resolve ``check_input``: ``None`` reads tensor values only where that needs no device sync."""
    if is_tracing():
        return False
    if check_input is None:
        return device.type != "cuda"
    return check_input


def check_finite(A: torch.Tensor, name: str = "A") -> None:
    """Raise ``ValueError`` if ``A`` holds NaN or Inf, naming the first batch entries (host sync)."""
    # x·0 is ±0 for every finite x and NaN for ±inf and NaN: one product and one sum decide the common case
    if bool(torch.isfinite((A * 0).sum())):
        return
    finite = torch.isfinite(A).flatten(-2).all(-1)
    if not bool(finite.all()):
        raise ValueError(f"{name} must hold only finite values, found NaN or Inf in {_entries(~finite)}")


def raise_if_invalid(valid: torch.Tensor, message: Callable[[], str]) -> None:
    """Raise ``ValueError(message() + the failing batch entries)`` unless every flag of ``valid`` is set;
    the message is built only then (it may read values)."""
    if not bool(valid.all()):
        raise ValueError(f"{message()}; failing {_entries(~valid)}")


def estimated_condition(A: torch.Tensor, mask: torch.Tensor) -> str:
    """κ of the first matrices of ``A`` selected by ``mask``, by float64 eigenvalues, for error messages
    (a host read; only called where the values are read anyway). Shapes: ``(*, n, n)`` and ``(*,)``."""
    chosen = A[mask][:5].double()
    if chosen.numel() == 0 or not bool(torch.isfinite(chosen).all()):
        return "the flagged matrices hold non-finite values"
    return "their κ(A): " + ", ".join(map(_condition, torch.linalg.eigvalsh(0.5 * (chosen + chosen.mT))))


def _condition(eigenvalues: torch.Tensor) -> str:
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    if low > 0:
        return f"{high / low:.3g}"
    if high > 0:
        return f"not positive definite (λmin/λmax = {low / high:.2g})"
    return "not positive semi-definite"


def _entries(mask: torch.Tensor) -> str:
    if mask.ndim == 0:
        return "the matrix"
    indices = [tuple(i) if len(i) > 1 else i[0] for i in mask.nonzero().tolist()]
    shown = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
    return f"batch entries [{shown}] ({len(indices)} of {mask.numel()})"


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(value: int, name: str, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float(value: float, name: str, *, minimum: float = 0.0, strict: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real ``> minimum`` (strict) or ``>= minimum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite float {relation} {minimum:g}, got {value!r}")


def check_momentum(value: float | None, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a finite real in ``[0, 1]`` (a BatchNorm momentum)."""
    ok = value is None or (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.0 <= value <= 1.0
    )
    if not ok:
        raise ValueError(
            f"{name} must be None (cumulative average) or a float in [0, 1] (the weight of each new batch "
            f"in the running statistics, as in torch.nn.BatchNorm2d), got {value!r}"
        )


def nonfinite_samples(x: torch.Tensor) -> list[int]:
    """Indices of the samples (dimension 0) of ``x`` that hold NaN or Inf (a host read)."""
    return (~torch.isfinite(x).flatten(1).all(dim=1)).nonzero().flatten().tolist()


def has_forward(model: torch.nn.Module) -> bool:
    """Whether ``model`` defines ``forward`` (a LightningModule need not: its steps may call a submodule)."""
    forward = getattr(type(model), "forward", None)
    if forward is None or forward is torch.nn.Module.forward:
        return False
    try:  # LightningModule.forward only forwards to nn.Module's, which raises
        from lightning.pytorch import LightningModule
    except ImportError:
        return True
    return forward is not LightningModule.forward


def refuse_double_backward(method: str) -> None:
    """Raise if a backward runs with a graph requested (``create_graph=True``, Hessians, gradient penalties).

    The Lyapunov, fused unrolled and Daleckii-Krein backwards are not differentiable themselves; a graph
    through them would silently drop the second-order term, so it is refused.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"method={method!r} does not support double backward (a graph of its gradient was requested: "
            "create_graph=True, torch.autograd.functional.hessian, a gradient penalty); use method='ns', "
            "whose backward is differentiable, for second derivatives"
        )
