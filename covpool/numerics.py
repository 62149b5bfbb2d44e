"""Working precision, symmetrisation and the ridge: the few numerical conventions every root and layer
shares."""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype second-order statistics and roots are computed in: float64 stays, everything else is float32."""
    return torch.promote_types(dtype, torch.float32)


def symmetrize(A: torch.Tensor) -> torch.Tensor:
    """``(A + Aᵀ) / 2`` over the last two dimensions, in one kernel. Shape: ``(*, n, n)``."""
    return torch.lerp(A, A.mT, 0.5)


def eye_like(A: torch.Tensor) -> torch.Tensor:
    """``n × n`` identity with the dtype and device of ``A`` (``(*, n, n)``); broadcasts over the batch."""
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def is_tracing() -> bool:
    """Whether ``torch.compile`` or ``torch.export`` is tracing: no tensor value can be read on the host."""
    return torch.compiler.is_compiling()


def add_to_diagonal(A: torch.Tensor, values: torch.Tensor | float) -> torch.Tensor:
    """``A + diag(values)`` as ``A + values · I``: purely functional, so traced graphs export to ONNX (an
    in-place or scattered diagonal update decomposes to a copy into a view, which the exporter refuses).

    Shapes: ``A (*, n, n)``, ``values`` a float or a ``(*,)`` tensor (one value per matrix).
    """
    eye = eye_like(A)
    if isinstance(values, torch.Tensor):
        return torch.addcmul(A, values[..., None, None], eye)
    return torch.add(A, eye, alpha=values)


def with_relative_ridge(A: torch.Tensor, eps: float) -> torch.Tensor:
    """``A + eps (tr(A) / n) I``: the roots' relative ridge. Shape ``(*, n, n)``.

    The map is self-adjoint (``⟨X, A + eps (tr A / n) I⟩ = ⟨X + eps (tr X / n) I, A⟩``), so the same function
    carries a gradient back through the ridge.
    """
    if eps == 0.0:
        return A
    mean = A.diagonal(dim1=-2, dim2=-1).sum(-1) * (eps / A.shape[-1])
    return add_to_diagonal(A, mean)
