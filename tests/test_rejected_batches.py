"""A batch a covpool layer rejects changes none of its state (its submodules' buffers included), and the
error names the layer and the samples; feature scales the dtype holds are pooled right or rejected; the
argument checks the newcomers met (integer features, momentum, a state of another group_size)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from covpool import CovPoolHead, SecondOrderTokenHead, ZCABatchNorm1d, ZCABatchNorm2d

# Every layer and option that owns state, with an input of the right shape.
LAYERS = {
    "head_reduced": (lambda root: CovPoolHead(16, 3, reduction_dim=8, root=root), (4, 16, 3, 3)),
    "head_unreduced": (lambda root: CovPoolHead(8, 3, reduction_dim=None, root=root), (4, 8, 3, 3)),
    "head_tokens": (
        lambda root: CovPoolHead(8, 3, reduction_dim=4, input_format="NLC", root=root),
        (4, 9, 8),
    ),
    "token_head": (lambda root: SecondOrderTokenHead(8, 3, reduction_dim=4, root=root), (4, 10, 8)),
    "zca2d": (lambda root: ZCABatchNorm2d(8, group_size=4, root=root), (4, 8, 3, 3)),
    "zca2d_cumulative": (
        lambda root: ZCABatchNorm2d(8, group_size=4, momentum=None, root=root),
        (4, 8, 3, 3),
    ),
    "zca1d": (lambda root: ZCABatchNorm1d(8, group_size=8, root=root), (4, 6, 8)),
}


def state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in layer.state_dict().items()}


def assert_same_state(layer: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def trained(name: str, root: dict) -> tuple[nn.Module, torch.Size]:
    build, shape = LAYERS[name]
    layer = build(root).train()
    layer(torch.randn(shape))  # running statistics away from their initial values
    return layer, torch.Size(shape)


class TestRejectedBatchChangesNothing:
    @pytest.mark.parametrize("name", LAYERS)
    def test_nan_in_one_sample_is_named_and_changes_no_buffer(self, name: str) -> None:
        layer, shape = trained(name, {"check_input": True})
        before = state(layer)
        x = torch.randn(shape)
        x[1].view(-1)[3] = float("nan")
        kind = type(layer).__name__
        with pytest.raises(ValueError, match=rf"{kind}.*samples \[1\] of 4.*unchanged"):
            layer(x)
        assert_same_state(layer, before)
        layer.eval()(torch.randn(shape))  # and evaluation still works on clean input

    @pytest.mark.parametrize("name", LAYERS)
    def test_without_host_checks_the_output_is_nan_and_no_buffer_changes(self, name: str) -> None:
        layer, shape = trained(name, {"check_input": False})
        before = state(layer)
        x = torch.randn(shape)
        x[1].view(-1)[3] = float("nan")
        out = layer(x)
        assert not torch.isfinite(out).all()
        assert_same_state(layer, before)

    def test_overflowing_reduction_statistics_are_rejected(self) -> None:
        layer, shape = trained("head_reduced", {})
        before = state(layer)
        with pytest.raises(ValueError, match=r"CovPoolHead\(16, reduction_dim=8\).*not finite.*unchanged"):
            layer(1e20 * torch.randn(shape))
        assert_same_state(layer, before)


class TestScales:
    @pytest.mark.parametrize("name", LAYERS)
    @pytest.mark.parametrize("scale", [1e-20, 1e20])
    @pytest.mark.parametrize("training", [True, False])
    def test_right_or_rejected(self, name: str, scale: float, training: bool) -> None:
        """Right: the float32 layer agrees with a float64 copy of itself; else a ValueError."""
        layer, shape = trained(name, {})
        reference = copy.deepcopy(layer).double().train(training)
        layer.train(training)
        pooled = {"pre_logits": True} if not isinstance(layer, (ZCABatchNorm1d, ZCABatchNorm2d)) else {}
        first, second = torch.randn(shape), torch.randn(shape)
        try:
            outputs = [layer(scale * x, **pooled) for x in (first, second)]
        except ValueError as error:
            assert type(layer).__name__ in str(error)
            return
        # Absolute slack: a thousandth of the expected size, and float32's resolution of the layer's
        # features at unit scale (in eval mode the reduction's BatchNorm shifts tiny inputs onto offsets
        # next to which their variation is below any float32 digit; the float64 layer keeps ~1e-19 of it).
        floor = 1e-6 * float(reference(first.double(), **pooled).abs().max())
        expected = [reference((scale * x).double(), **pooled) for x in (first, second)]
        for out, want in zip(outputs, expected, strict=True):
            atol = 1e-3 * float(want.abs().max()) + floor
            torch.testing.assert_close(out.double(), want, rtol=1e-3, atol=atol)
        if torch.allclose(outputs[0], outputs[1]):  # the same output for two batches only where it is due
            torch.testing.assert_close(expected[0], expected[1], rtol=1e-3, atol=floor)

    def test_head_features_scale_with_the_input(self) -> None:
        head = CovPoolHead(8, 0, reduction_dim=None, root="eigh")
        x = torch.randn(3, 8, 4, 4)
        unit = head(x)
        for scale in (1e-20, 1e20):
            torch.testing.assert_close(head(scale * x) / scale, unit, rtol=1e-4, atol=1e-6)


class TestArguments:
    @pytest.mark.parametrize(
        "head, shape",
        [
            (CovPoolHead(8, 3, reduction_dim=4), (2, 8, 3, 3)),
            (CovPoolHead(8, 3, reduction_dim=None, input_format="NLC"), (2, 5, 8)),
            (SecondOrderTokenHead(8, 3, reduction_dim=4), (2, 5, 8)),
        ],
    )
    def test_integer_features_are_a_type_error(self, head: nn.Module, shape: tuple[int, ...]) -> None:
        with pytest.raises(TypeError, match=r"floating-point tensor .* got torch.int64"):
            head(torch.randint(0, 5, shape))

    @pytest.mark.parametrize("momentum", [2.0, -0.1, float("nan"), True, "0.1"])
    def test_momentum_outside_0_1_refused(self, momentum) -> None:
        with pytest.raises(ValueError, match=r"momentum must be None .* or a float in \[0, 1\]"):
            ZCABatchNorm2d(32, momentum=momentum)

    @pytest.mark.parametrize("momentum", [None, 0.0, 0.5, 1.0, 1])
    def test_momentum_in_range_accepted(self, momentum) -> None:
        ZCABatchNorm2d(8, group_size=4, momentum=momentum)

    def test_state_of_another_group_size_names_it(self) -> None:
        saved = nn.Sequential(ZCABatchNorm2d(32, group_size=16)).state_dict()
        layer = nn.Sequential(ZCABatchNorm2d(32, group_size=8))
        with pytest.raises(
            RuntimeError,
            match=r"'0': the state was saved with group_size=16 \(2 groups\).*"
            r"this layer has group_size=8",
        ):
            layer.load_state_dict(saved)
