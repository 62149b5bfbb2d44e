"""timm's conventions on covpool's registered models, asserted here (timm's own tests/test_models.py stays
timm's): the config keys of timm's CNN and ViT configs, ``pool_size``, ``reset_classifier(0, "")`` to the
unpooled map or tokens, ``global_pool=`` in the constructors, fx feature extraction (timm's and
torchvision's), and the TorchScript answer."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import covpool
from covpool import CovPoolHead, SecondOrderTokenHead, ZCABatchNorm2d

CNN = ("resnet18_isqrtcov", dict(reduction_dim=8), (2, 3, 64, 64))
VIT = ("vit_tiny_patch16_224_sovit", dict(reduction_dim=8, img_size=32, depth=1), (2, 3, 32, 32))
FAMILIES = {"cnn": CNN, "vit": VIT}
# What timm's own configs of the same families carry (the keys timm's tests and data pipeline read).
TIMM_REFERENCE = {"cnn": "resnet18.a1_in1k", "vit": "vit_tiny_patch16_224.augreg_in21k_ft_in1k"}
CFG_KEYS = ("num_classes", "input_size", "pool_size", "crop_pct", "interpolation", "mean", "std")
CFG_KEYS += ("first_conv", "classifier", "fixed_input_size")


def tiny(family: str, **kwargs) -> torch.nn.Module:
    name, model_kwargs, _ = FAMILIES[family]
    return timm.create_model(name, **{"num_classes": 5, **model_kwargs, **kwargs}).eval()


def inputs(family: str) -> torch.Tensor:
    return torch.randn(FAMILIES[family][2])


@pytest.fixture(autouse=True)
def _quiet_jit():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
        yield


class TestConfig:
    @pytest.mark.parametrize("family", FAMILIES)
    def test_carries_the_keys_of_timms_config_of_the_family(self, family: str) -> None:
        name = FAMILIES[family][0]
        ours = timm.models.get_pretrained_cfg(name).to_dict()
        theirs = timm.models.get_pretrained_cfg(TIMM_REFERENCE[family]).to_dict()
        for key in CFG_KEYS:
            assert (ours.get(key) is None) == (theirs.get(key) is None), key

    def test_pool_size_is_the_final_map_at_the_input_size(self) -> None:
        for name in timm.list_models("*_isqrtcov"):
            cfg = timm.models.get_pretrained_cfg(name)
            model = timm.create_model(name, reduction_dim=8, layers=(1, 1, 1, 1)).eval()
            with torch.no_grad():
                features = model.forward_features(torch.zeros(1, *cfg.input_size))
            assert tuple(features.shape[-2:]) == cfg.pool_size, name


class TestUnpooled:
    @pytest.mark.parametrize("family", FAMILIES)
    def test_reset_to_unpooled_gives_forward_features(self, family: str) -> None:
        model, x = tiny(family), inputs(family)
        features = model.forward_features(x)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), features) and model.num_classes == 0
        pooled = CovPoolHead.POOL_TYPE if family == "cnn" else SecondOrderTokenHead.POOL_TYPE
        model.reset_classifier(3, pooled)
        assert model(x).shape == (2, 3)

    @pytest.mark.parametrize("family", FAMILIES)
    def test_global_pool_is_accepted_by_the_constructor(self, family: str) -> None:
        x = inputs(family)
        unpooled = tiny(family, num_classes=0, global_pool="")
        assert unpooled(x).ndim == (4 if family == "cnn" else 3)
        pooled = "cov" if family == "cnn" else "token"
        assert tiny(family, global_pool=pooled)(x).shape == (2, 5)
        with pytest.raises(ValueError, match="num_classes=0"):
            tiny(family, num_classes=5, global_pool="")
        with pytest.raises(ValueError, match="global_pool|pool_type"):
            tiny(family, global_pool="avg")

    def test_attached_head_follows_the_same_convention(self) -> None:
        model = covpool.attach_head("resnet18", num_classes=4, reduction_dim=8).eval()
        x = torch.randn(2, 3, 64, 64)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), model.forward_features(x))

    def test_unpooled_needs_no_classes_in_reset(self) -> None:
        head = CovPoolHead(8, 3, reduction_dim=4)
        with pytest.raises(ValueError, match=r"pool_type='' \(no pooling\) needs num_classes=0"):
            head.reset(3, "")
        assert head.pool_type == "cov" and head.fc.out_features == 3  # unchanged by the refusal


class TestFx:
    @pytest.mark.parametrize("family", FAMILIES)
    def test_torchvision_feature_extractor_without_tracer_options(self, family: str) -> None:
        model, x = tiny(family), inputs(family)
        nodes = get_graph_node_names(model)[1]
        assert "head.fc" in nodes
        extractor = create_feature_extractor(model, {"head.fc": "logits", nodes[-2]: "before"})
        torch.testing.assert_close(extractor(x)["logits"], model(x))

    @pytest.mark.parametrize("family", FAMILIES)
    def test_fx_graph_trains(self, family: str) -> None:
        model = tiny(family).train()
        extractor = create_feature_extractor(model, {"head.fc": "logits"})
        extractor(inputs(family))["logits"].sum().backward()
        assert all(p.grad is not None for p in extractor.parameters())

    def test_timm_features_only_fx(self) -> None:
        name, kwargs, shape = CNN
        model = timm.create_model(name, features_only=True, feature_cls="fx", **kwargs).eval()
        features = model(torch.randn(shape))
        assert [f.shape[1] for f in features] == model.feature_info.channels()

    @pytest.mark.parametrize(
        "head, bad, match",
        [
            (CovPoolHead(8, 3, reduction_dim=4), torch.randn(2, 6, 3, 3), r"\(N, 8, H, W\), got shape"),
            (SecondOrderTokenHead(8, 3, reduction_dim=4), torch.randn(2, 5, 7), r"\(N, L, 8\), got shape"),
        ],
    )
    def test_checks_run_in_the_traced_graph(self, head, bad, match) -> None:
        traced = torch.fx.symbolic_trace(torch.nn.Sequential(head))
        with pytest.raises(ValueError, match=match):
            traced(bad)
        with pytest.raises(TypeError, match="floating-point"):
            traced(bad.long())

    def test_zca_layers_are_timm_leaf_modules(self) -> None:
        assert ZCABatchNorm2d in timm.models.get_notrace_modules()
        model = covpool.convert_zca_batchnorm(tiny("cnn"), layers="first", group_size=8).eval()
        extractor = create_feature_extractor(
            model, {"head.fc": "logits"}, tracer_kwargs={"leaf_modules": timm.models.get_notrace_modules()}
        )
        x = inputs("cnn")
        torch.testing.assert_close(extractor(x)["logits"], model(x))
        assert "conv1" in get_graph_node_names(model, tracer_kwargs={"leaf_modules": [ZCABatchNorm2d]})[1]


class TestTorchScript:
    @pytest.mark.parametrize("family", FAMILIES)
    def test_models_script_and_run_in_python(self, family: str, tmp_path) -> None:
        model, x = tiny(family), inputs(family)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), model(x))
        traced = create_feature_extractor(model, {"head.fc": "y"})
        torch.testing.assert_close(torch.jit.script(traced)(x)["y"], model(x))
        # The covariance and its root are a Python call: such a module cannot be saved.
        with pytest.raises(RuntimeError, match="Could not export Python function call"):
            torch.jit.save(scripted, str(tmp_path / "m.pt"))

    def test_zca_layers_name_the_supported_routes(self) -> None:
        model = covpool.convert_zca_batchnorm(tiny("cnn"), layers="first", group_size=8)
        routes = r"ZCABatchNorm2d cannot be compiled by TorchScript.*torch\.export.*export_onnx"
        with pytest.raises(TypeError, match=routes):
            torch.jit.script(model)
