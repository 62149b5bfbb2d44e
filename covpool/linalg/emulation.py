"""Emulated low-precision matrix products on any device: TF32 and bfloat16 operands, float32 accumulation.

A tensor core computing a float32 product in TF32 or bfloat16 rounds both operands to the format, forms
each elementwise product exactly (11 + 11 or 8 + 8 significant bits fit float32's 24) and accumulates in
float32. :func:`emulated_products` does the same with ordinary float32 products: it rounds both factors of
every ``matmul``/``@``/``mm``/``bmm``/``addmm``/``baddbmm`` to the format first (the added ``input`` of
``addmm``/``baddbmm`` stays float32, as the accumulator does), so rounding experiments on a CPU see the
operand rounding of the GPU's products; only the order of the float32 accumulation differs.

:func:`round_to` rounds to nearest, ties to even, on the bits of the float32 values: the format keeps the
sign, the 8 exponent bits and the top ``MANTISSA_BITS[fmt]`` of float32's 23 mantissa bits (TF32 10,
bfloat16 7), so its unit roundoff is ``2^-(bits + 1)`` (:data:`UNIT_ROUNDOFF`). Both share float32's
exponent range: a value rounds to ``±inf`` only past the format's largest finite value; inf and NaN pass
unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Format = Literal["tf32", "bf16"]
MANTISSA_BITS: dict[str, int] = {"tf32": 10, "bf16": 7}
"""Explicit mantissa bits of each format (float32 has 23)."""
UNIT_ROUNDOFF: dict[str, float] = {fmt: 2.0 ** -(bits + 1) for fmt, bits in MANTISSA_BITS.items()}
"""Unit roundoff of each format: TF32 ``2^-11`` (4.9e-4), bfloat16 ``2^-8`` (3.9e-3)."""
EPSILON: dict[str, float] = {fmt: 2.0 * u for fmt, u in UNIT_ROUNDOFF.items()}
"""Machine epsilon of each format (twice the unit roundoff, as ``torch.finfo(dtype).eps``): the convention of
the rounding models (:func:`covpool.linalg.iteration.residual_rounding`,
:func:`covpool.linalg.lyapunov.rounding_error`)."""


def round_to(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``x`` (float32) rounded to ``fmt`` to nearest, ties to even, returned as float32. Shape: any.

    Example:
        >>> round_to(torch.tensor([1.0 + 2.0**-11]), "tf32")  # a tie: to the even neighbour 1
        tensor([1.])
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_to rounds float32 tensors, got {x.dtype}")
    dropped = 23 - MANTISSA_BITS[fmt]
    bits = x.contiguous().view(torch.int32)
    # add half a unit in the last kept place, less one unless the kept part is odd, then truncate
    odd = (bits >> dropped) & 1
    rounded = ((bits + ((1 << (dropped - 1)) - 1) + odd) & ~((1 << dropped) - 1)).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).view_as(x)


PRODUCT_OPS: frozenset[str] = frozenset({"aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm"})
"""The ATen products: ``matmul`` and ``@`` reach the dispatcher as ``mm`` or ``bmm``. Their two factors
are the last two positional arguments."""


class ProductCounter(TorchDispatchMode):
    """Count the float32 matrix products (:data:`PRODUCT_OPS`) run while the mode is active, backwards
    included, in ``products``."""

    def __init__(self) -> None:
        super().__init__()
        self.products = 0

    def _operands(self, args: tuple) -> tuple:
        """The factors as the product will see them (unchanged here)."""
        return args

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        if str(func.overloadpacket) in PRODUCT_OPS and all(a.dtype == torch.float32 for a in args[-2:]):
            args = self._operands(args)
            self.products += 1
        return func(*args, **(kwargs or {}))


class emulated_products(ProductCounter):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Round both factors of every float32 matrix product to ``fmt`` while the mode is active.

    A dispatch mode rather than a function mode: it also sees the products autograd runs in a backward
    (a ``TorchFunctionMode`` does not see the calls of a custom Function's backward, which the autograd
    engine makes outside the mode). ``products`` counts the products it rounded. Factors of other dtypes
    (float64 references) are left alone.

    Example:
        >>> A = torch.tensor([[1.0 + 2.0**-9]])
        >>> with emulated_products("bf16") as mode:
        ...     product = A @ A
        >>> product.item(), mode.products
        (1.0, 1)
    """

    def __init__(self, fmt: Format) -> None:
        super().__init__()
        if fmt not in MANTISSA_BITS:
            raise ValueError(f"fmt must be one of {sorted(MANTISSA_BITS)}, got {fmt!r}")
        self.fmt: Format = fmt

    def _operands(self, args: tuple) -> tuple:
        """The factors rounded to the format; ``input`` of ``addmm``/``baddbmm`` stays float32."""
        return (*args[:-2], *(round_to(a, self.fmt) for a in args[-2:]))
