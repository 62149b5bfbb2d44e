"""Emulated TF32/bfloat16 products (:mod:`covpool.linalg.emulation`): rounding against hand-computed bit
patterns and a float64 reference in every rounding mode, the error of a product within the format's bound,
Triton's split product ``tf32x3`` against its formula evaluated exactly, and a mode that sees every product
of the roots, forward and backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import covpool
from covpool.linalg.emulation import (
    EPSILON,
    ROUNDINGS,
    TF32X3_ROUNDOFF,
    UNIT_ROUNDOFF,
    ProductCounter,
    emulated_products,
    round_to,
    split_product,
)
from covpool.linalg.planner import plan_root
from covpool.testing import random_spd, relative_error

FORMATS = ("tf32", "bf16")


def _from_bits(*patterns: int) -> torch.Tensor:
    return torch.tensor(np.array(patterns, dtype=np.uint32).view(np.float32))


def _bits(x: torch.Tensor) -> list[int]:
    return [int(b) for b in x.numpy().view(np.uint32)]


def _reference_rounding(x: torch.Tensor, fmt: str, rounding: str) -> torch.Tensor:
    """``x`` rounded in float64 arithmetic from its exponent (normal float32 values, no overflow): the
    multiple of the format's unit in the last place that the rounding picks."""
    v = x.double()
    ulp = torch.ldexp(torch.ones_like(v), torch.frexp(v).exponent - 1 - {"tf32": 10, "bf16": 7}[fmt])
    q = v.abs() / ulp  # exact: a division by a power of two
    if rounding == "truncation":
        k = q.floor()
    elif rounding == "nearest-away":
        k = (q + 0.5).floor()
    else:
        k = torch.round(q)  # half to even
    return (v.sign() * k * ulp).float()


class TestRoundTo:
    @pytest.mark.parametrize(
        "fmt, inputs, expected",
        [
            # TF32 keeps 10 mantissa bits: the last kept one is 0x2000, half of it 0x1000
            ("tf32", 0x3F801000, 0x3F800000),  # 1 + 2^-11, a tie, to the even 1
            ("tf32", 0x3F803000, 0x3F804000),  # 1 + 3·2^-11, a tie, to the even 1 + 2^-8
            ("tf32", 0x3F801001, 0x3F802000),  # just above a tie: up
            ("tf32", 0x3F800FFF, 0x3F800000),  # just below: down
            ("tf32", 0xBF801001, 0xBF802000),  # negative values round by magnitude
            ("tf32", 0x3FFFF000, 0x40000000),  # a carry into the exponent: 2 - 2^-11 ties to 2
            ("tf32", 0x00001000, 0x00000000),  # a subnormal tie to even zero
            ("bf16", 0x3F808000, 0x3F800000),  # 1 + 2^-8, a tie, to the even 1
            ("bf16", 0x3F818000, 0x3F820000),  # 1 + 3·2^-8, a tie, to the even 1 + 2^-6
            ("bf16", 0x3F808001, 0x3F810000),
            ("bf16", 0x3F807FFF, 0x3F800000),
            ("bf16", 0xC2A58000, 0xC2A60000),  # -82.75: tie to even
        ],
    )
    def test_bit_patterns(self, fmt: str, inputs: int, expected: int) -> None:
        assert _bits(round_to(_from_bits(inputs), fmt)) == [expected]

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_overflow_inf_nan(self, fmt: str) -> None:
        x = _from_bits(0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000)
        out = round_to(torch.cat([x, torch.tensor([float("nan")])]), fmt)
        assert out[:4].tolist() == [float("inf"), -float("inf"), float("inf"), -float("inf")]
        assert torch.isnan(out[4])

    def test_bfloat16_matches_torch(self) -> None:
        x = torch.randn(100_000) * torch.logspace(-40, 38, 100_000)
        torch.testing.assert_close(round_to(x, "bf16"), x.to(torch.bfloat16).float(), rtol=0, atol=0)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_nearest_within_half_an_ulp(self, fmt: str) -> None:
        x = torch.randn(100_000)
        out = round_to(x, fmt)
        dropped = 23 - {"tf32": 10, "bf16": 7}[fmt]
        assert all(b & ((1 << dropped) - 1) == 0 for b in _bits(out))
        assert bool(((out - x).abs() <= UNIT_ROUNDOFF[fmt] * x.abs()).all())
        assert bool(((out - x).abs() > 0.5 * UNIT_ROUNDOFF[fmt] * x.abs()).any())  # not a finer rounding

    @pytest.mark.parametrize(
        "fmt, rounding, inputs, expected",
        [
            ("tf32", "nearest-away", 0x3F801000, 0x3F802000),  # 1 + 2^-11, a tie: away from zero, up
            ("tf32", "nearest-away", 0x3F803000, 0x3F804000),  # a tie to the even neighbour is also away
            ("tf32", "nearest-away", 0xBF801000, 0xBF802000),  # negative ties: away from zero, down
            ("tf32", "nearest-away", 0x3F800FFF, 0x3F800000),  # below a tie: down
            ("tf32", "nearest-away", 0x3FFFF000, 0x40000000),  # a carry into the exponent
            ("tf32", "nearest-away", 0x7F7FF000, 0x7F800000),  # a tie at the largest: to inf
            ("tf32", "truncation", 0x3F803FFF, 0x3F802000),  # the dropped bits ignored
            ("tf32", "truncation", 0xBF803FFF, 0xBF802000),  # towards zero for negative values too
            ("tf32", "truncation", 0x7F7FFFFF, 0x7F7FE000),  # never overflows
            ("bf16", "nearest-away", 0x3F808000, 0x3F810000),
            ("bf16", "truncation", 0xC2A5FFFF, 0xC2A50000),
        ],
    )
    def test_bit_patterns_other_roundings(self, fmt: str, rounding: str, inputs: int, expected: int) -> None:
        assert _bits(round_to(_from_bits(inputs), fmt, rounding)) == [expected]

    @pytest.mark.parametrize("rounding", ROUNDINGS)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_matches_a_float64_reference(self, fmt: str, rounding: str) -> None:
        """Random normal values and exact ties (a kept part ending in 0 and in 1), against the rounding
        done in float64 from the exponent."""
        x = torch.randn(50_000) * torch.logspace(-30, 30, 50_000)
        dropped = 23 - {"tf32": 10, "bf16": 7}[fmt]
        ties = (x.view(torch.int32) & ~((1 << dropped) - 1)) | (1 << (dropped - 1))
        x = torch.cat([x, ties.view(torch.float32)])
        torch.testing.assert_close(
            round_to(x, fmt, rounding), _reference_rounding(x, fmt, rounding), rtol=0, atol=0
        )

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_truncation_towards_zero_within_an_ulp(self, fmt: str) -> None:
        x = torch.randn(100_000)
        out = round_to(x, fmt, "truncation")
        error = (out - x).abs()
        assert bool((out.abs() <= x.abs()).all()) and bool((out * x >= 0).all())
        assert bool((error < EPSILON[fmt] * x.abs()).all())
        assert bool((error > UNIT_ROUNDOFF[fmt] * x.abs()).any())  # more than half an ulp: not to nearest

    def test_rejects_other_dtypes(self) -> None:
        with pytest.raises(TypeError, match="float32"):
            round_to(torch.ones(2, dtype=torch.float64), "tf32")

    def test_rejects_unknown_rounding_and_format(self) -> None:
        with pytest.raises(ValueError, match=r"rounding must be one of \['nearest-even'.*got 'nearest'"):
            round_to(torch.ones(2), "tf32", "nearest")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"fmt must be one of .*got 'fp16'"):
            round_to(torch.ones(2), "fp16")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"rounding must be one of .*got 'even'"):
            emulated_products("tf32", rounding="even")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"fmt must be one of \['bf16', 'tf32', 'tf32x3'\], got 'tf16'"):
            emulated_products("tf16")  # type: ignore[arg-type]


class TestEmulatedProducts:
    @pytest.mark.parametrize("rounding", ROUNDINGS)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_product_error_within_the_format_bound(self, fmt: str, rounding: str) -> None:
        A, B = torch.randn(4, 64, 64), torch.randn(4, 64, 64)
        with emulated_products(fmt, rounding) as mode:
            products = [A @ B, torch.bmm(A, B), torch.baddbmm(A, A, B), torch.mm(A[0], B[0])]
        assert mode.products == 4
        exact = A.double() @ B.double()
        scale = A.double().abs() @ B.double().abs()
        u = UNIT_ROUNDOFF[fmt] * (2 if rounding == "truncation" else 1)
        bound = (2 * u + u * u + 64 * 2.0**-24) * scale
        for product, reference in zip(products, (exact, exact, exact + A.double(), exact[0]), strict=True):
            error = (product.double() - reference).abs()
            assert bool((error <= bound if product.ndim == 3 else error <= bound[0]).all())
        # the operands were rounded: the error is far above float32's
        assert ((products[0].double() - exact).abs() / scale).max() > 0.25 * u

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_truncation_biases_positive_products_down(self, fmt: str) -> None:
        """Positive factors: truncation lowers every factor, so the products fall short by about twice
        the mean truncation error (some 0.7 u each); to nearest the errors average out."""
        A, B = torch.rand(4, 64, 64), torch.rand(4, 64, 64)
        exact = A.double() @ B.double()
        signed = {}
        for rounding in ROUNDINGS:
            with emulated_products(fmt, rounding):
                signed[rounding] = ((A @ B).double() / exact - 1).mean().item() / UNIT_ROUNDOFF[fmt]
        assert signed["truncation"] < -1.0
        assert abs(signed["nearest-even"]) < 0.1 and abs(signed["nearest-away"]) < 0.1

    @pytest.mark.parametrize("fmt", [*FORMATS, "tf32x3"])
    def test_float64_products_untouched(self, fmt: str) -> None:
        A = torch.randn(8, 8, dtype=torch.float64)
        with emulated_products(fmt) as mode:
            product = A @ A
        assert mode.products == 0
        torch.testing.assert_close(product, A @ A, rtol=0, atol=0)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_sees_every_product_of_the_roots(self, fmt: str) -> None:
        """Forward and Lyapunov backward of mtp: the plan's products, the Schatten-8 normalisation's two and
        the residual test's three, every one rounded (counted apart by an outer counting mode)."""
        n = 32
        plan = plan_root(
            covpool.RootOptions(method="mtp"), n, eps=0.0, device=torch.device("cpu"), dtype=torch.float32
        )
        assert plan.gradient == "lyapunov" and plan.normalization == "schatten8"
        A = random_spd(2, n=n, condition=10.0).float().requires_grad_(True)
        with ProductCounter() as total, emulated_products(fmt) as emulated:
            out = covpool.sqrtm(A, method="mtp", check_input=False)
            (grad,) = torch.autograd.grad(out, A, torch.randn_like(out))
        expected = plan.forward.forward_products() + plan.backward.backward_products() + 2 + 3
        assert emulated.products == total.products == expected
        (full,) = torch.autograd.grad(covpool.sqrtm(A, method="mtp"), A, torch.randn_like(out))
        assert relative_error(grad, full).max() > 10 * 2.0**-24  # the backward's products were rounded too


def _split_reference(a: torch.Tensor, b: torch.Tensor, rounding: str) -> torch.Tensor:
    """Triton's ``tf32x3`` of scalars (flat tensors) evaluated exactly in float64 and rounded to float32 at
    each of its two float32 accumulations: ``small = fl(a_hi b_lo + a_lo b_hi)``, ``fl(a_hi b_hi + small)``
    (the 11-bit products and their sums are exact in float64)."""
    a_hi, b_hi = (
        _reference_rounding(a, "tf32", "nearest-away"),
        _reference_rounding(b, "tf32", "nearest-away"),
    )
    a_lo = _reference_rounding(a - a_hi, "tf32", rounding)
    b_lo = _reference_rounding(b - b_hi, "tf32", rounding)
    small = (a_hi.double() * b_lo.double() + a_lo.double() * b_hi.double()).float()
    return (a_hi.double() * b_hi.double() + small.double()).float()


class TestSplitProduct:
    @pytest.mark.parametrize("rounding", ROUNDINGS)
    def test_scalars_match_the_formula_exactly(self, rounding: str) -> None:
        a, b = torch.randn(20_000), torch.randn(20_000)
        a[::2] = ((a[::2].view(torch.int32) & ~0x1FFF) | 0x1000).view(torch.float32)  # ties of the split
        out = split_product(a.reshape(-1, 1, 1), b.reshape(-1, 1, 1), rounding).flatten()
        torch.testing.assert_close(out, _split_reference(a, b, rounding), rtol=0, atol=0)

    def test_drops_the_product_of_the_low_parts(self) -> None:
        a = b = 1.0 + 2.0**-12  # a_hi = 1, a_lo = 2^-12: the product lacks a_lo b_lo = 2^-24
        assert split_product(torch.tensor([[a]]), torch.tensor([[b]])).item() == 1.0 + 2.0**-11
        assert (torch.tensor([[a]]) @ torch.tensor([[b]])).item() == 1.0 + 2.0**-11  # float32 ties to it
        a, b = 1.0 + 2.0**-12 + 2.0**-13, 1.0 + 2.0**-12 + 2.0**-13
        exact = a * b  # 1 + 2^-11 + 2^-12 + (2^-12 + 2^-13)^2 = ... + 2^-24 + 2^-24 + 2^-26
        assert split_product(torch.tensor([[a]]), torch.tensor([[b]])).item() == 1.0 + 2.0**-11 + 2.0**-12
        assert exact - (1.0 + 2.0**-11 + 2.0**-12) == (2.0**-12 + 2.0**-13) ** 2

    @pytest.mark.parametrize("rounding", ROUNDINGS)
    def test_error_within_its_bound_far_below_tf32(self, rounding: str) -> None:
        k = 256
        A, B = torch.randn(4, 64, k), torch.randn(4, k, 64)
        out = split_product(A, B, rounding).double()
        exact = A.double() @ B.double()
        scale = A.double().abs() @ B.double().abs()
        relative = (out - exact).abs() / scale
        assert bool((relative <= TF32X3_ROUNDOFF[rounding] + (k + 2) * 2.0**-24).all())
        with emulated_products("tf32", rounding):
            tf32 = ((A @ B).double() - exact).abs() / scale
        assert relative.max() < tf32.max() / 30

    def test_mode_routes_every_product(self) -> None:
        A, B, C = torch.randn(3, 16, 16), torch.randn(3, 16, 16), torch.randn(3, 16, 16)
        expected = split_product(A, B)
        nan = torch.full_like(C, float("nan"))
        with emulated_products("tf32x3") as mode:
            out = [A @ B, torch.bmm(A, B), torch.mm(A[0], B[0]), torch.addmm(C[0], A[0], B[0])]
            out += [torch.baddbmm(C, A, B, beta=0.5, alpha=-2.0), torch.baddbmm(nan, A, B, beta=0.0)]
        assert mode.products == 6 and mode.rounding == "truncation"
        for got, want in zip(out[:3], (expected, expected, expected[0]), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(out[3], C[0] + expected[0], rtol=0, atol=0)
        torch.testing.assert_close(out[4], 0.5 * C - 2.0 * expected, rtol=0, atol=0)
        torch.testing.assert_close(out[5], expected, rtol=0, atol=0)

    def test_infinite_factor_gives_its_product(self) -> None:
        """``a_lo = inf - inf`` is NaN: Triton zeroes NaN of the small terms, so ``inf · 1`` stays inf."""
        A = torch.tensor([[float("inf"), 0.0], [1.0, 2.0]])
        B = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
        with emulated_products("tf32x3"):
            out = A @ B
        assert out.tolist() == [[float("inf"), -float("inf")], [3.0, 1.0]]
