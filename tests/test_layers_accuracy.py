"""Every root method through every layer, on the inputs the layers really see.

A float32 layer is compared with a float64 copy of itself using ``root="eigh"`` (the exact reference),
forward and input gradients, on rank-deficient covariances: fewer positions than channels for the heads
(their ridge ``eps=1e-4`` bounds the condition number by about ``n / eps``), and ZCA groups fed by a
rank-27 "first convolution" (3×3×3 patches into 64 channels), as in DBN.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import covpool
from covpool.testing import assert_relative_close


def head_input(batch: int, channels: int, side: int, device: torch.device) -> torch.Tensor:
    """Correlated feature maps ``(batch, channels, side, side)`` in float64."""
    mixing = torch.randn(channels, channels, dtype=torch.float64) / channels**0.5
    x = torch.randn(batch, side * side, channels, dtype=torch.float64) @ mixing
    return x.transpose(1, 2).reshape(batch, channels, side, side).to(device)


def rank_27_features(batch: int, device: torch.device) -> torch.Tensor:
    """64 channels that are linear in 27 numbers per position, like the output of a 3×3 RGB convolution."""
    patches = torch.randn(batch, 27, 8, 8, dtype=torch.float64)
    weights = torch.randn(64, 27, dtype=torch.float64) / 27**0.5
    return torch.einsum("nkhw,ck->nchw", patches, weights).to(device)


def compare(layer: nn.Module, x64: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(float32 output, float64 reference output, float32 input grad, float64 reference input grad)."""
    reference = copy.deepcopy(layer).double()
    for module in reference.modules():
        if hasattr(module, "root"):
            module.root = covpool.RootOptions(method="eigh")
    x32 = x64.float().requires_grad_()
    x64 = x64.clone().requires_grad_()
    out32, out64 = layer.float()(x32), reference(x64)
    upstream = torch.randn_like(out64)
    (g32,) = torch.autograd.grad(out32, x32, upstream.float())
    (g64,) = torch.autograd.grad(out64, x64, upstream)
    return out32.detach().double(), out64.detach(), g32.double(), g64


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)[..., None]


class TestHeads:
    @pytest.mark.parametrize("method", ["mtp", "mpa", "eigh", "auto"])
    @pytest.mark.parametrize(("channels", "side"), [(64, 7), (256, 7), (256, 14)])
    def test_covpool_head_on_rank_deficient_covariances(self, method, channels, side, device):
        if channels == 256 and method in ("mpa", "eigh") and device.type == "cpu" and side == 14:
            pytest.skip("covered at 7x7; keeps the CPU suite short")
        head = covpool.CovPoolHead(channels, 0, reduction_dim=None, root=method).to(device)
        out, out_ref, grad, grad_ref = compare(head, head_input(4, channels, side, device))
        assert_relative_close(flat(out), flat(out_ref), rtol=1e-3, what=f"{method} pooled features")
        assert_relative_close(flat(grad), flat(grad_ref), rtol=1e-3, what=f"{method} input gradients")

    @pytest.mark.parametrize("method", ["mtp", "mpa", "eigh", "auto"])
    def test_token_head_with_fewer_tokens_than_dimensions(self, method, device):
        head = covpool.SecondOrderTokenHead(48, 0, reduction_dim=None, root=method).to(device)
        tokens = head_input(4, 48, 5, device).flatten(2).transpose(1, 2)  # 25 visual tokens < 48
        tokens = torch.cat([torch.randn(4, 1, 48, dtype=torch.float64, device=device), tokens], dim=1)
        out, out_ref, grad, grad_ref = compare(head, tokens)
        assert_relative_close(flat(out), flat(out_ref), rtol=1e-3, what=f"{method} features")
        assert_relative_close(flat(grad), flat(grad_ref), rtol=1e-3, what=f"{method} input gradients")

    def test_newton_schulz_head_matches_its_float64_self(self, device):
        head = covpool.CovPoolHead(32, 0, reduction_dim=None, root="ns").to(device)
        reference = copy.deepcopy(head).double()
        x = head_input(2, 32, 7, device)
        assert_relative_close(flat(head(x.float()).double()), flat(reference(x)), rtol=1e-4)


class TestZCA:
    @pytest.mark.parametrize("method", ["mtp", "mpa", "eigh", "auto", "ns"])
    @pytest.mark.parametrize("group_size", [16, 64])
    def test_whitening_of_rank_deficient_groups(self, method, group_size, device):
        layer = covpool.ZCABatchNorm2d(64, group_size=group_size, root=method, affine=False).to(device)
        x = rank_27_features(8, device)
        out, out_ref, grad, grad_ref = compare(layer, x)
        if method == "ns":  # five steps are far from the root here: the layer must still run and be finite
            assert torch.isfinite(out).all() and torch.isfinite(grad).all()
            return
        # Groups of 64 channels hold 27 dimensions: the whitening amplifies the null directions by
        # 1/sqrt(eps); float32 rounding of the covariance alone moves them by about 1e-3 there.
        limit = 1e-3 if group_size == 16 else 5e-2
        assert_relative_close(flat(out), flat(out_ref), rtol=limit, what=f"{method} whitened output")
        assert_relative_close(flat(grad), flat(grad_ref), rtol=limit, what=f"{method} input gradients")


@pytest.mark.parametrize("setting", ["high", "medium"])
class TestUnderReducedMatmulPrecision:
    """With TF32 ("high", as Lightning advises) or bfloat16 ("medium") products set globally, the layers
    keep the accuracy of the tests above: their roots scope their products to full float32. On CPU the
    setting reaches oneDNN only; run with ``--device cuda`` for the tensor-core case."""

    @pytest.fixture(autouse=True)
    def _reduced(self, setting, restore_matmul_precision):
        torch.set_float32_matmul_precision(setting)

    @pytest.mark.parametrize("method", ["auto", "mtp", "mpa"])
    def test_covpool_head(self, method, device):
        head = covpool.CovPoolHead(64, 0, reduction_dim=None, root=method).to(device)
        out, out_ref, grad, grad_ref = compare(head, head_input(4, 64, 7, device))
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        assert_relative_close(flat(out), flat(out_ref), rtol=1e-3, what=f"{method} pooled features")
        assert_relative_close(flat(grad), flat(grad_ref), rtol=1e-3, what=f"{method} input gradients")

    @pytest.mark.parametrize("method", ["auto", "mtp", "mpa"])
    def test_zca(self, method, device):
        layer = covpool.ZCABatchNorm2d(64, group_size=16, root=method, affine=False).to(device)
        out, out_ref, grad, grad_ref = compare(layer, rank_27_features(8, device))
        assert_relative_close(flat(out), flat(out_ref), rtol=1e-3, what=f"{method} whitened output")
        assert_relative_close(flat(grad), flat(grad_ref), rtol=1e-3, what=f"{method} input gradients")
