"""Tests of CovPoolHead (iSQRT-COV) and SecondOrderTokenHead (So-ViT)."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn
from torch.autograd import gradcheck

import covpool
from covpool import CovPoolHead, SecondOrderTokenHead
from covpool.functional import covariance, triu_vectorize
from covpool.testing import reference_root


def _pool_reference(tokens: torch.Tensor) -> torch.Tensor:
    """``triu(Σ^(1/2))`` of ``(N, M, d)`` tokens, float64 eigh reference."""
    return triu_vectorize(reference_root(covariance(tokens.double())))


class TestCovPoolHead:
    @pytest.mark.skipif(
        torch.torch_version.TorchVersion(torch.__version__) < "2.12",
        reason="dynamo before torch 2.12 cannot compile the roots (tests/test_linalg_roots.py says why)",
    )
    def test_torch_compile_of_a_conv_model_is_one_quiet_graph_guarded_on_the_options(self, covpool_warnings):
        # d = 32 with the default ridge takes mtp's fused unrolled backward while tracing.
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), CovPoolHead(8, 4, reduction_dim=32))
        x = torch.randn(2, 3, 8, 8)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with covpool_warnings() as caught:
            out = compiled(x)
            out.sum().backward()
        assert caught == []
        torch.testing.assert_close(out, model(x), rtol=1e-3, atol=1e-4)
        # The plan is a constant of the graph: other options must give another graph, not the old plan
        # (the paper's single Taylor approximant is far off at the head's ridge).
        model[2].root = covpool.RootOptions(method="mtp", steps=1)
        with torch.no_grad():
            approximated, expected = compiled(x), model(x)
        torch.testing.assert_close(approximated, expected, rtol=1e-3, atol=1e-4)
        assert not torch.allclose(approximated, out.detach(), rtol=1e-2, atol=1e-3)

    @pytest.mark.parametrize("reduction_dim", [None, 6])
    @pytest.mark.parametrize("input_format", ["NCHW", "NLC"])
    def test_shapes_and_num_features(self, reduction_dim, input_format, device):
        head = CovPoolHead(
            10, 7, reduction_dim=reduction_dim, input_format=input_format, root="eigh", device=device
        )
        d = reduction_dim or 10
        x = torch.randn(3, 10, 4, 5, device=device)
        if input_format == "NLC":
            x = rearrange(x, "n c h w -> n (h w) c")
        assert head.num_features == d * (d + 1) // 2 and head.in_features == 10
        assert head(x).shape == (3, 7)
        assert head(x, pre_logits=True).shape == (3, head.num_features)

    def test_pre_logits_reference_and_formats_agree(self, device):
        head = CovPoolHead(5, 3, reduction_dim=None, eps=0.0, root="eigh", device=device, dtype=torch.float64)
        x = torch.randn(2, 5, 6, 6, dtype=torch.float64, device=device)
        tokens = rearrange(x, "n c h w -> n (h w) c")
        features = head(x, pre_logits=True)
        assert torch.allclose(features, _pool_reference(tokens), atol=1e-10)
        assert torch.allclose(head(x), head.fc(features))
        nlc = CovPoolHead(
            5,
            3,
            reduction_dim=None,
            eps=0.0,
            input_format="NLC",
            root="eigh",
            device=device,
            dtype=torch.float64,
        )
        assert torch.allclose(nlc(tokens, pre_logits=True), features)

    def test_reduction_is_conv_bn_relu(self, device):
        head = CovPoolHead(
            8, 3, reduction_dim=4, eps=0.0, root="eigh", device=device, dtype=torch.float64
        ).eval()
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64, device=device)
        reduced = torch.relu(head.reduce[1](head.reduce[0](x)))
        expected = _pool_reference(rearrange(reduced, "n c h w -> n (h w) c"))
        assert torch.allclose(head(x, pre_logits=True), expected, atol=1e-10)

    def test_rank_deficient_positions(self, device):
        head = CovPoolHead(
            32, 4, reduction_dim=16, root="eigh", device=device
        )  # 2 x 2 = 4 positions < 16 channels
        x = torch.randn(3, 32, 2, 2, device=device, requires_grad=True)
        head(x).square().sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    def test_gradcheck(self, device):
        head = CovPoolHead(3, 2, reduction_dim=None, eps=0.0, root="eigh", device=device, dtype=torch.float64)
        x = torch.randn(2, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
        assert gradcheck(head, (x,))

    def test_autocast_bfloat16(self, device):
        head = CovPoolHead(16, 5, reduction_dim=8, device=device).eval()
        x = torch.randn(2, 16, 7, 7, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            features = head(x, pre_logits=True)
            logits = head(x)
        assert features.dtype == logits.dtype == torch.bfloat16
        assert torch.allclose(features.float(), head(x, pre_logits=True), rtol=5e-2, atol=5e-2)

    def test_reset_and_identity_classifier(self, device):
        head = CovPoolHead(8, 0, reduction_dim=4, root="eigh", device=device, dtype=torch.float64)
        x = torch.randn(2, 8, 3, 3, dtype=torch.float64, device=device)
        assert isinstance(head.fc, nn.Identity)
        assert torch.equal(head(x), head(x, pre_logits=True))
        head.reset(11)
        assert head(x).shape == (2, 11) and head.fc.weight.dtype == torch.float64
        head.reset(0)
        assert head(x).shape == (2, head.num_features)
        with pytest.raises(ValueError, match="pool_type must be None"):
            head.reset(3, pool_type="avg")

    @pytest.mark.parametrize("shape", [(1, 2), (2, 1)])
    def test_two_positions_give_the_exact_root(self, shape, device):
        # Two positions: Σ = v vᵀ / 4 with v = x₁ - x₂, so Σ^(1/2) = v vᵀ / (2 ‖v‖) exactly.
        head = CovPoolHead(4, 2, reduction_dim=None, eps=0.0, root="eigh", device=device, dtype=torch.float64)
        x = torch.randn(3, 4, *shape, dtype=torch.float64, device=device)
        v = rearrange(x, "n c h w -> n (h w) c")
        v = v[:, 0] - v[:, 1]
        root = v[:, :, None] * v[:, None, :] / (2 * v.norm(dim=-1))[:, None, None]
        assert torch.allclose(head(x, pre_logits=True), triu_vectorize(root), atol=1e-10)

    @pytest.mark.parametrize(
        ("input_format", "shape", "match"),
        [
            (
                "NCHW",
                (2, 8, 1, 1),
                r"feature maps of at least 2 positions \(H \* W >= 2\), "
                r"got shape \(2, 8, 1, 1\).*output_stride",
            ),
            ("NLC", (2, 1, 8), r"at least 2 tokens \(N, L >= 2, C\), got shape \(2, 1, 8\)"),
        ],
    )
    def test_rejects_a_single_position(self, input_format, shape, match):
        # The covariance of one position is zero: the head's output would not depend on the input.
        head = CovPoolHead(8, 3, reduction_dim=4, input_format=input_format)
        with pytest.raises(ValueError, match=f"CovPoolHead needs {match}"):
            head(torch.randn(shape))

    @pytest.mark.parametrize("input_format", ["NCHW", "NLC"])
    def test_gradients_have_the_parameters_strides(self, input_format):
        # A channels-last input (ViT tokens, ConvNeXt maps) must not give the 1x1 conv a channels-last weight
        # gradient: DDP compares strides exactly ("Grad strides do not match bucket view strides").
        head = CovPoolHead(8, 3, reduction_dim=4, input_format=input_format)
        x = torch.randn(2, 3, 3, 8).permute(0, 3, 1, 2)  # channels-last (N, C, H, W)
        if input_format == "NLC":
            x = torch.randn(2, 9, 8)  # the head's (N, C, L, 1) view of it is channels-last
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # the CPU convolution that keeps the input's layout needs > 1 thread
        try:
            head(x).sum().backward()
        finally:
            torch.set_num_threads(threads)
        for name, param in head.named_parameters():
            assert param.grad.stride() == param.stride(), name

    def test_errors(self):
        with pytest.raises(ValueError, match=r"\(N, 8, H, W\), got shape \(2, 6, 3, 3\)"):
            CovPoolHead(8, 3, reduction_dim=4)(torch.randn(2, 6, 3, 3))
        with pytest.raises(ValueError, match=r"\(N, L, 8\), got shape \(2, 8, 3, 3\)"):
            CovPoolHead(8, 3, input_format="NLC")(torch.randn(2, 8, 3, 3))
        with pytest.raises(ValueError, match="input_format must be one of"):
            CovPoolHead(8, 3, input_format="NHWC")
        with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
            CovPoolHead(8, -1)


class TestSecondOrderTokenHead:
    def test_shapes_and_num_features(self, device):
        head = SecondOrderTokenHead(12, 5, reduction_dim=4, num_prefix_tokens=2, root="eigh", device=device)
        x = torch.randn(3, 2 + 9, 12, device=device)
        assert head.num_features == 12 + 10
        assert head(x).shape == (3, 5) and head(x, pre_logits=True).shape == (3, 22)

    def test_logits_are_class_plus_covariance_classifiers(self, device):
        head = SecondOrderTokenHead(
            6, 4, reduction_dim=None, eps=0.0, root="eigh", device=device, dtype=torch.float64
        )
        x = torch.randn(2, 1 + 10, 6, dtype=torch.float64, device=device)
        features = head(x, pre_logits=True)
        pooled = _pool_reference(x[:, 1:])
        assert torch.allclose(features, torch.cat([x[:, 0], pooled], dim=-1), atol=1e-10)
        w_cls, w_cov = head.fc.weight.split([6, 21], dim=1)
        assert torch.allclose(head(x), x[:, 0] @ w_cls.T + pooled @ w_cov.T + head.fc.bias, atol=1e-10)

    def test_prefix_tokens_only_feed_the_class_token(self, device):
        head = SecondOrderTokenHead(
            8,
            3,
            reduction_dim=4,
            num_prefix_tokens=3,
            eps=0.0,
            root="eigh",
            device=device,
            dtype=torch.float64,
        )
        x = torch.randn(2, 3 + 6, 8, dtype=torch.float64, device=device)
        changed = x.clone()
        changed[:, 1:3] = torch.randn(2, 2, 8, dtype=torch.float64)  # register / distillation tokens
        assert torch.equal(head(changed), head(x))
        reduced = x[:, 3:] @ head.reduce.weight.T
        assert torch.allclose(head(x, pre_logits=True)[:, 8:], _pool_reference(reduced), atol=1e-8)

    def test_gradcheck(self, device):
        head = SecondOrderTokenHead(
            4, 2, reduction_dim=3, eps=0.0, root="eigh", device=device, dtype=torch.float64
        )
        x = torch.randn(2, 1 + 6, 4, dtype=torch.float64, device=device, requires_grad=True)
        assert gradcheck(head, (x,))

    def test_autocast_bfloat16(self, device):
        head = SecondOrderTokenHead(16, 5, reduction_dim=8, device=device)
        x = torch.randn(2, 1 + 16, 16, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            features = head(x, pre_logits=True)
            logits = head(x)
        assert features.dtype == logits.dtype == torch.bfloat16
        assert torch.allclose(features.float(), head(x, pre_logits=True), rtol=5e-2, atol=5e-2)

    def test_reset_and_errors(self, device):
        head = SecondOrderTokenHead(8, 0, reduction_dim=4, root="eigh", device=device)
        x = torch.randn(2, 5, 8, device=device)
        assert torch.equal(head(x), head(x, pre_logits=True))
        head.reset(6)
        assert head(x).shape == (2, 6)
        with pytest.raises(ValueError, match=r"\(N, L, 8\), got shape \(2, 5, 6\)"):
            head(torch.randn(2, 5, 6, device=device))
        for length in (1, 2):  # one visual token has a zero covariance
            with pytest.raises(
                ValueError,
                match=rf"at least 2 visual tokens .*num_prefix_tokens=1 .*\(L >= 3\), got shape "
                rf"\(2, {length}, 8\) \({length - 1} visual tokens\)",
            ):
                head(torch.randn(2, length, 8, device=device))
        with pytest.raises(ValueError, match="num_prefix_tokens must be an integer >= 1"):
            SecondOrderTokenHead(8, 3, num_prefix_tokens=0)
