"""Emulated TF32/bfloat16 products (:mod:`covpool.linalg.emulation`): rounding against hand-computed bit
patterns, the error of a product within the format's bound, and a mode that sees every product of the
roots, forward and backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import covpool
from covpool.linalg.emulation import UNIT_ROUNDOFF, ProductCounter, emulated_products, round_to
from covpool.linalg.planner import plan_root
from covpool.testing import random_spd, relative_error

FORMATS = ("tf32", "bf16")


def _from_bits(*patterns: int) -> torch.Tensor:
    return torch.tensor(np.array(patterns, dtype=np.uint32).view(np.float32))


def _bits(x: torch.Tensor) -> list[int]:
    return [int(b) for b in x.numpy().view(np.uint32)]


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

    def test_rejects_other_dtypes(self) -> None:
        with pytest.raises(TypeError, match="float32"):
            round_to(torch.ones(2, dtype=torch.float64), "tf32")


class TestEmulatedProducts:
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_product_error_within_the_format_bound(self, fmt: str) -> None:
        A, B = torch.randn(4, 64, 64), torch.randn(4, 64, 64)
        with emulated_products(fmt) as mode:
            products = [A @ B, torch.bmm(A, B), torch.baddbmm(A, A, B), torch.mm(A[0], B[0])]
        assert mode.products == 4
        exact = A.double() @ B.double()
        scale = A.double().abs() @ B.double().abs()
        u = UNIT_ROUNDOFF[fmt]
        bound = (2 * u + u * u + 64 * 2.0**-24) * scale
        for product, reference in zip(products, (exact, exact, exact + A.double(), exact[0]), strict=True):
            error = (product.double() - reference).abs()
            assert bool((error <= bound if product.ndim == 3 else error <= bound[0]).all())
        # the operands were rounded: the error is far above float32's
        assert ((products[0].double() - exact).abs() / scale).max() > 0.25 * u

    def test_float64_products_untouched(self) -> None:
        A = torch.randn(8, 8, dtype=torch.float64)
        with emulated_products("bf16") as mode:
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
