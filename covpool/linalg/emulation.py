"""Emulated low-precision matrix products on any device: TF32 and bfloat16 operands, float32 accumulation,
and Triton's split-TF32 product ``tf32x3``.

A tensor core computing a float32 product in TF32 or bfloat16 rounds both operands to the format, forms
each elementwise product exactly (11 + 11 or 8 + 8 significant bits fit float32's 24) and accumulates in
float32. :func:`emulated_products` does the same with ordinary float32 products: it rounds both factors of
every ``matmul``/``@``/``mm``/``bmm``/``addmm``/``baddbmm`` to the format first (the added ``input`` of
``addmm``/``baddbmm`` stays float32, as the accumulator does), so rounding experiments on a CPU see the
operand rounding of the GPU's products; only the order of the float32 accumulation differs.

:func:`round_to` rounds on the bits of the float32 values: the format keeps the sign, the 8 exponent bits and
the top ``MANTISSA_BITS[fmt]`` of float32's 23 mantissa bits (TF32 10, bfloat16 7), so its unit roundoff is
``2^-(bits + 1)`` (:data:`UNIT_ROUNDOFF`). Both share float32's exponent range: a value rounds to ``±inf``
only past the format's largest finite value; inf and NaN pass unchanged. The rounding is a parameter
(:data:`Rounding`), because the hardware differs: to nearest with ties to even (the default; what the
certificate of ``precision="tf32"`` was first fitted on), to nearest with ties away from zero (cuBLAS on
Ampere was observed doing so, PyTorch issues 53635 and 78275; PTX's ``cvt.rna.tf32.f32``, which Triton's
``tf32x3`` uses for its split) and truncation (Triton's ``input_precision="tf32"`` feeds the raw float32
bits to the tensor core, which ignores the dropped ones; its ``tl.dot`` docstring warns of it). Truncation
errs by up to a whole unit in the last kept place, ``2 u`` = :data:`EPSILON`, always towards zero.

``emulated_products("tf32x3")`` emulates Triton's ``input_precision="tf32x3"`` (its ``F32DotTC`` pass):
each float32 factor ``a`` splits as ``a_hi = cvt.rna.tf32(a)`` and ``a_lo = a - a_hi`` (exact in float32),
and the product is three TF32 products accumulated in float32 in Triton's order,
``(a_lo b_hi + a_hi b_lo) + a_hi b_hi`` (``a_lo b_lo`` dropped), NaN of the small terms replaced by zero
before the large one is added (so an infinite factor gives its infinite product, not NaN). The TF32
products see ``a_lo`` as float32 bits, so the operand rounding of the tensor core applies to it (``a_hi``
is a TF32 value already): truncation on Triton. Each elementwise product then errs by at most
:data:`TF32X3_ROUNDOFF` relative, about 6 to 10 float32 epsilons, before the float32 accumulation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Format = Literal["tf32", "bf16"]
"""The rounded operand formats."""
ProductFormat = Literal["tf32", "bf16", "tf32x3"]
"""What :func:`emulated_products` emulates: products of operands rounded to a :data:`Format`, or Triton's
split product ``tf32x3``."""
Rounding = Literal["nearest-even", "nearest-away", "truncation"]
"""How a float32 value is rounded to a format: to nearest with ties to even, to nearest with ties away from
zero, or towards zero (the dropped bits ignored)."""
ROUNDINGS: tuple[Rounding, ...] = ("nearest-even", "nearest-away", "truncation")
"""Every :data:`Rounding`, the default first."""
DEFAULT_ROUNDING: dict[str, Rounding] = {
    "tf32": "nearest-even",
    "bf16": "nearest-even",
    "tf32x3": "truncation",
}
"""The operand rounding of :func:`emulated_products` when none is given: to nearest, ties to even, for the
formats; truncation for ``tf32x3``, as Triton's TF32 products see its low parts."""
MANTISSA_BITS: dict[str, int] = {"tf32": 10, "bf16": 7}
"""Explicit mantissa bits of each format (float32 has 23)."""
UNIT_ROUNDOFF: dict[str, float] = {fmt: 2.0 ** -(bits + 1) for fmt, bits in MANTISSA_BITS.items()}
"""Unit roundoff of each format: TF32 ``2^-11`` (4.9e-4), bfloat16 ``2^-8`` (3.9e-3)."""
EPSILON: dict[str, float] = {fmt: 2.0 * u for fmt, u in UNIT_ROUNDOFF.items()}
"""Machine epsilon of each format (twice the unit roundoff, as ``torch.finfo(dtype).eps``): the convention of
the rounding models (:func:`covpool.linalg.iteration.residual_rounding`,
:func:`covpool.linalg.lyapunov.rounding_error`). Under truncation it is also the largest relative error of
one rounding."""
TF32X3_ROUNDOFF: dict[str, float] = {
    "nearest-even": 3 * 2.0**-22 + 2.0**-32,
    "nearest-away": 3 * 2.0**-22 + 2.0**-32,
    "truncation": 5 * 2.0**-22 + 2.0**-31,
}
"""Largest relative error of one elementwise product ``a b`` of ``tf32x3`` before the float32 accumulation,
for each rounding of the low parts (:data:`DEFAULT_ROUNDING` on Triton: truncation, 1.19e-6, ten float32
epsilons; 7.2e-7 to nearest). With ``|a_lo| <= 2^-11 |a|`` and the low part rounded by a relative ``δ``
(``2^-11`` to nearest, ``2^-10`` truncated), the three terms are
``a b + a b_lo δ_b + b a_lo δ_a - a_lo b_lo (1 + δ_a + δ_b)``: ``2^-11 (δ_a + δ_b) + 2^-22 (1 + 2 δ)``."""


def _check_rounding(rounding: object, name: str = "rounding") -> Rounding:
    if rounding not in ROUNDINGS:
        raise ValueError(f"{name} must be one of {list(ROUNDINGS)}, got {rounding!r}")
    return rounding  # type: ignore[return-value]


def round_to(x: torch.Tensor, fmt: Format, rounding: Rounding = "nearest-even") -> torch.Tensor:
    """``x`` (float32) rounded to ``fmt`` by ``rounding`` (:data:`Rounding`), returned as float32.

    Shape:
        - x: any; output: the same.

    Example:
        >>> x = torch.tensor([1.0 + 2.0**-11, -(1.0 + 2.0**-11)])  # ties between 1 and 1 + 2^-10
        >>> round_to(x, "tf32")  # to the even neighbour
        tensor([ 1., -1.])
        >>> round_to(x, "tf32", "nearest-away").abs().tolist() == [1.0 + 2.0**-10] * 2
        True
        >>> round_to(torch.tensor([1.0 + 2.0**-10 - 2.0**-23]), "tf32", "truncation")
        tensor([1.])
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_to rounds float32 tensors, got {x.dtype}")
    if fmt not in MANTISSA_BITS:
        raise ValueError(f"fmt must be one of {sorted(MANTISSA_BITS)}, got {fmt!r}")
    rounding = _check_rounding(rounding)
    dropped = 23 - MANTISSA_BITS[fmt]
    bits = x.contiguous().view(torch.int32)
    # on the magnitude bits (the sign bit is apart, so the same integer addition serves negative values):
    # add half a unit in the last kept place (less one, unless the kept part is odd, for ties to even),
    # then drop the bits below it; a carry runs into the exponent, as a rounding up to a power of two does
    if rounding == "nearest-even":
        bits = bits + ((1 << (dropped - 1)) - 1) + ((bits >> dropped) & 1)
    elif rounding == "nearest-away":
        bits = bits + (1 << (dropped - 1))
    rounded = (bits & ~((1 << dropped) - 1)).view(torch.float32)
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


def split_product(A: torch.Tensor, B: torch.Tensor, rounding: Rounding = "truncation") -> torch.Tensor:
    """``A @ B`` as Triton's ``input_precision="tf32x3"`` forms it (see the module docstring), float32.

    ``A_hi = round_to(A, "tf32", "nearest-away")`` (``cvt.rna``), ``A_lo = A - A_hi``, likewise ``B``; the
    TF32 products round ``A_lo`` and ``B_lo`` by ``rounding`` (Triton's: truncation); then
    ``small = A_hi B_lo + A_lo B_hi`` (``A_lo B_hi`` first), NaN in it set to zero, and
    ``small + A_hi B_hi``, each sum accumulated in float32.

    Shape:
        - A: (n, k) or (b, n, k); B: (k, m) or (b, k, m); output: (n, m) or (b, n, m).

    Example:
        >>> a, b = 1.0 + 2.0**-12 + 2.0**-20, 1.0 + 2.0**-12
        >>> exact = a * b  # 1 + 2^-11 + 2^-20 + 2^-24 + 2^-32: 2^-24 is a_lo b_lo, dropped
        >>> split_product(torch.tensor([[a]]), torch.tensor([[b]])).item() == 1.0 + 2.0**-11 + 2.0**-20
        True
    """
    for name, x in (("A", A), ("B", B)):
        if x.dtype != torch.float32:
            raise TypeError(f"split_product multiplies float32 tensors, got {x.dtype} for {name}")
    rounding = _check_rounding(rounding)
    A_hi, B_hi = round_to(A, "tf32", "nearest-away"), round_to(B, "tf32", "nearest-away")
    A_lo, B_lo = round_to(A - A_hi, "tf32", rounding), round_to(B - B_hi, "tf32", rounding)
    batched = A.ndim == 3
    accumulate = torch.baddbmm if batched else torch.addmm
    small = accumulate(torch.matmul(A_lo, B_hi), A_hi, B_lo)
    small = torch.where(torch.isnan(small), torch.zeros_like(small), small)
    return accumulate(small, A_hi, B_hi)


class emulated_products(ProductCounter):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Round both factors of every float32 matrix product to ``fmt`` by ``rounding`` while the mode is
    active, or, for ``fmt="tf32x3"``, form every float32 product as :func:`split_product` does.

    ``rounding`` (:data:`Rounding`) is how the tensor core rounds a float32 operand; ``None`` takes
    :data:`DEFAULT_ROUNDING` (to nearest, ties to even, for ``"tf32"`` and ``"bf16"``; truncation, Triton's,
    for the low parts of ``"tf32x3"``). For ``tf32x3`` the ``input`` of ``addmm``/``baddbmm`` is added
    after the three products, as Triton adds the accumulator of ``tl.dot`` after them.

    A dispatch mode rather than a function mode: it also sees the products autograd runs in a backward
    (a ``TorchFunctionMode`` does not see the calls of a custom Function's backward, which the autograd
    engine makes outside the mode). ``products`` counts the products it emulated (a ``tf32x3`` product
    counts once, though it costs three TF32 products). Factors of other dtypes (float64 references) are
    left alone.

    Example:
        >>> A = torch.tensor([[1.0 + 2.0**-9]])
        >>> with emulated_products("bf16") as mode:
        ...     product = A @ A
        >>> product.item(), mode.products
        (1.0, 1)
        >>> tie = torch.tensor([[1.0 + 2.0**-8]])  # halfway between 1 and 1 + 2^-7
        >>> with emulated_products("bf16", rounding="nearest-away"):
        ...     (tie @ tie).item() == (1.0 + 2.0**-7) ** 2
        True
        >>> with emulated_products("tf32x3"):  # error about 2^-22: float32 products would give 2^-23
        ...     abs((A @ A).item() - (1.0 + 2.0**-9) ** 2) < 2.0**-21
        True
    """

    def __init__(self, fmt: ProductFormat, rounding: Rounding | None = None) -> None:
        super().__init__()
        if fmt not in DEFAULT_ROUNDING:
            raise ValueError(f"fmt must be one of {sorted(DEFAULT_ROUNDING)}, got {fmt!r}")
        self.fmt: ProductFormat = fmt
        self.rounding: Rounding = DEFAULT_ROUNDING[fmt] if rounding is None else _check_rounding(rounding)

    def _operands(self, args: tuple) -> tuple:
        """The factors rounded to the format; ``input`` of ``addmm``/``baddbmm`` stays float32."""
        return (*args[:-2], *(round_to(a, self.fmt, self.rounding) for a in args[-2:]))  # type: ignore[arg-type]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        packet = str(func.overloadpacket)
        split = packet in PRODUCT_OPS and all(a.dtype == torch.float32 for a in args[-2:])
        if self.fmt != "tf32x3" or not split:
            return super().__torch_dispatch__(func, types, args, kwargs)
        kwargs = dict(kwargs or {})
        out = kwargs.pop("out", None)
        result = split_product(args[-2], args[-1], self.rounding)
        if packet in ("aten.addmm", "aten.baddbmm"):
            alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
            result = result if alpha == 1 else alpha * result
            if beta != 0:  # beta = 0 ignores input, NaN included, as the ATen products do
                result = args[0] + result if beta == 1 else beta * args[0] + result
        self.products += 1
        if out is not None:
            return out.copy_(result)
        return result
