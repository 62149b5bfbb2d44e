"""timm integration: registered covpool models, backbone weights from a file, and attach_head."""

from __future__ import annotations

import threading

import pytest
import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

import covpool
from covpool.models import CovPooledModel, IsqrtCovResNet, SoViT

# Small versions of the registered models: (name, create_model kwargs, input shape, head input width)
TINY = {
    "resnet18_isqrtcov": (dict(reduction_dim=8, in_chans=1), (2, 1, 64, 64), 512),
    "resnet50_isqrtcov": (dict(reduction_dim=8, layers=(1, 1, 1, 1)), (2, 3, 64, 64), 2048),
    "vit_small_patch16_224_sovit": (dict(reduction_dim=8, img_size=32, depth=1), (2, 3, 32, 32), 384),
}


def tiny(name: str, **kwargs) -> nn.Module:
    model_kwargs, _, _ = TINY[name]
    return timm.create_model(name, **{"num_classes": 5, **model_kwargs, **kwargs})


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def run_with_timeout(fn, timeout: float) -> BaseException | None:
    """Run ``fn`` in a daemon thread; return what it raised, fail if it is still running after ``timeout``."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            raised.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    return raised[0] if raised else None


class TestRegisteredModels:
    def test_registered(self) -> None:
        assert {"resnet18_isqrtcov", "resnet50_isqrtcov"} <= set(timm.list_models("*_isqrtcov"))
        assert "vit_small_patch16_224_sovit" in timm.list_models("*_sovit")
        assert not set(timm.list_models("*_isqrtcov", pretrained=True))  # no weights are published

    @pytest.mark.parametrize("name", list(TINY))
    def test_head_api(self, name: str) -> None:
        model = tiny(name).eval()
        x = torch.randn(TINY[name][1])
        features = model.forward_features(x)
        assert model.num_features == TINY[name][2]
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size)
        logits = model(x)
        assert logits.shape == (2, 5)
        torch.testing.assert_close(logits, model.get_classifier()(pooled))
        assert isinstance(model.get_classifier(), nn.Linear) and model.get_classifier().out_features == 5

        model.reset_classifier(3)
        assert model.num_classes == 3 and model(x).shape == (2, 3)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)

    @pytest.mark.parametrize("name", list(TINY))
    def test_data_config(self, name: str) -> None:
        model = tiny(name)
        config = resolve_model_data_config(model)
        assert config["input_size"] == (3, 224, 224)
        assert config["mean"] == model.pretrained_cfg["mean"]
        assert model.pretrained_cfg["classifier"] == "head.fc"

    def test_isqrtcov_head_sizes(self) -> None:
        model = tiny("resnet18_isqrtcov")
        assert isinstance(model, IsqrtCovResNet)
        assert model.head_hidden_size == 8 * 9 // 2

    @pytest.mark.parametrize(("output_stride", "size"), [(16, 4), (32, 2)])
    def test_last_downsampling(self, output_stride: int, size: int) -> None:
        model = tiny("resnet18_isqrtcov", output_stride=output_stride)
        assert model.forward_features(torch.randn(1, 1, 64, 64)).shape == (1, 512, size, size)

    def test_backbone_matches_timm(self) -> None:
        ours = backbone_state(tiny("resnet18_isqrtcov", in_chans=3))
        theirs = timm.create_model("resnet18", num_classes=0).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}

    def test_features_only(self) -> None:
        model = tiny("resnet18_isqrtcov", features_only=True, out_indices=(2, 4))
        maps = model(torch.randn(1, 1, 64, 64))
        assert [m.shape for m in maps] == [(1, 128, 8, 8), (1, 512, 4, 4)]
        assert model.feature_info.channels() == [128, 512]

    def test_training_step_reaches_all_parameters(self) -> None:
        model = tiny("vit_small_patch16_224_sovit")
        model(torch.randn(TINY["vit_small_patch16_224_sovit"][1])).square().sum().backward()
        assert isinstance(model, SoViT)
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name

    def test_sovit_rejects_other_pooling(self) -> None:
        with pytest.raises(ValueError, match="global_pool='token'"):
            tiny("vit_small_patch16_224_sovit", global_pool="avg")

    def test_sovit_rejects_a_single_visual_token(self) -> None:
        with pytest.raises(ValueError, match=r"img_size=\(16, 16\) and patch_size=\(16, 16\) has 1 visual"):
            tiny("vit_small_patch16_224_sovit", img_size=16)

    def test_isqrtcov_resnet_rejects_1x1_maps(self) -> None:
        model = tiny("resnet18_isqrtcov", output_stride=32)
        with pytest.raises(ValueError, match=r"CovPoolHead needs .*got shape \(2, 512, 1, 1\)"):
            model(torch.randn(2, 1, 32, 32))


class TestPretrained:
    @pytest.mark.parametrize(
        ("name", "source", "source_kwargs"),
        [
            ("resnet18_isqrtcov", "resnet18", dict(in_chans=1)),
            ("vit_small_patch16_224_sovit", "vit_small_patch16_224", dict(img_size=32, depth=1)),
        ],
    )
    def test_backbone_from_file(self, tmp_path, name: str, source: str, source_kwargs: dict) -> None:
        path = tmp_path / f"{source}.pth"
        source_state = timm.create_model(source, num_classes=10, **source_kwargs).state_dict()
        torch.save(source_state, path)

        torch.manual_seed(1)
        fresh = tiny(name)
        torch.manual_seed(1)
        loaded = tiny(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        for key, value in backbone_state(loaded).items():
            torch.testing.assert_close(value, source_state[key], rtol=0, atol=0, msg=key)
        for key, value in loaded.state_dict().items():  # the new head keeps its initialisation
            if key.startswith("head."):
                torch.testing.assert_close(value, fresh.state_dict()[key], rtol=0, atol=0, msg=key)

    def test_in_chans_adapted(self, tmp_path) -> None:
        path = tmp_path / "resnet18.pth"
        source_state = timm.create_model("resnet18").state_dict()
        torch.save(source_state, path)
        model = tiny("resnet18_isqrtcov", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        torch.testing.assert_close(model.conv1.weight, source_state["conv1.weight"].sum(1, keepdim=True))

    def test_pos_embed_resized(self, tmp_path) -> None:
        path = tmp_path / "vit.pth"
        torch.save(timm.create_model("vit_small_patch16_224", img_size=32, depth=1).state_dict(), path)
        model = tiny(
            "vit_small_patch16_224_sovit",
            img_size=48,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=path),
        )
        assert model.pos_embed.shape == (1, 1 + 9, 384)
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)

    def test_covpool_checkpoint_head_kept_when_shapes_match(self, tmp_path) -> None:
        saved = tiny("resnet18_isqrtcov", num_classes=1000)
        path = tmp_path / "covpool.pth"
        torch.save(saved.state_dict(), path)
        loaded = tiny(
            "resnet18_isqrtcov", num_classes=1000, pretrained=True, pretrained_cfg_overlay=dict(file=path)
        )
        for key, value in saved.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)

    def test_strict_backbone(self, tmp_path) -> None:
        path = tmp_path / "resnet34.pth"
        torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), path)
        overlay = dict(file=str(path))
        with pytest.raises(RuntimeError, match=r"unexpected keys \[layer1\.2"):
            tiny("resnet18_isqrtcov", in_chans=3, pretrained=True, pretrained_cfg_overlay=overlay)
        model = tiny(
            "resnet18_isqrtcov",
            in_chans=3,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            pretrained_strict=False,
        )
        torch.testing.assert_close(model.layer1[0].conv1.weight, torch.load(path)["layer1.0.conv1.weight"])

    @pytest.mark.parametrize("name", list(TINY))
    def test_no_source_fails_at_once(self, name: str) -> None:
        error = run_with_timeout(lambda: tiny(name, pretrained=True), timeout=10.0)
        assert isinstance(error, RuntimeError)
        assert "pretrained_cfg_overlay=dict(file=" in str(error) and name in str(error)

    @pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
    def test_unreachable_hub_fails_at_once(self, name: str, monkeypatch) -> None:
        attempts = []

        def refuse(address, timeout):
            attempts.append(address)
            raise OSError("network unreachable")

        monkeypatch.setattr("covpool.models.pretrained.socket.create_connection", refuse)
        monkeypatch.setattr("covpool.models.pretrained.try_to_load_from_cache", lambda *args: None)
        error = run_with_timeout(
            lambda: covpool.attach_head(name, num_classes=3, model_kwargs={"pretrained": True}), timeout=10.0
        )
        assert isinstance(error, RuntimeError) and attempts
        assert f"weights of {name!r}" in str(error) and "pretrained_cfg_overlay=dict(file=" in str(error)

    def test_local_file_needs_no_network(self, tmp_path, monkeypatch) -> None:
        path = tmp_path / "resnet18.pth"
        torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), path)
        monkeypatch.setattr(
            "covpool.models.pretrained.socket.create_connection",
            lambda *args, **kwargs: pytest.fail("no connection may be tried for a local file"),
        )
        model = covpool.models.create_timm_model(
            "resnet18", pretrained=True, num_classes=3, pretrained_cfg_overlay={"file": str(path)}
        )
        torch.testing.assert_close(model.conv1.weight, torch.load(path)["conv1.weight"])


class TestAttachHead:
    def test_resnet_weights_kept(self) -> None:
        backbone = timm.create_model("resnet18", num_classes=10).eval()
        before = {k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
        x = torch.randn(2, 3, 64, 64)
        features = backbone.forward_features(x)
        model = covpool.attach_head(backbone, num_classes=4, reduction_dim=8).eval()
        assert isinstance(model, CovPooledModel) and model.backbone is backbone
        state = model.state_dict()
        for key, value in before.items():
            torch.testing.assert_close(state[f"backbone.{key}"], value, rtol=0, atol=0)
        assert not any(key.startswith("backbone.fc.") for key in state)
        torch.testing.assert_close(model(x), model.head(features))
        assert model.num_features == 512 and model.head_hidden_size == 36 and model.num_classes == 4
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 36)
        assert resolve_model_data_config(model) == resolve_model_data_config(backbone)

    def test_default_num_classes_and_reset(self) -> None:
        model = covpool.attach_head("resnet18", reduction_dim=8, model_kwargs=dict(num_classes=7))
        assert model.get_classifier().out_features == 7
        model.reset_classifier(2)
        assert model.num_classes == 2 and model(torch.randn(2, 3, 64, 64)).shape == (2, 2)

    def test_vit_sovit(self) -> None:
        vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, reg_tokens=2).eval()
        x = torch.randn(2, 3, 32, 32)
        tokens = vit.forward_features(x)
        model = covpool.attach_head(vit, head="sovit", num_classes=3, reduction_dim=8).eval()
        assert model.head.num_prefix_tokens == 3
        torch.testing.assert_close(model(x), model.head(tokens))
        assert model.no_weight_decay() == {f"backbone.{n}" for n in vit.no_weight_decay()}

    def test_vit_with_registers_and_no_class_token(self) -> None:
        kwargs = dict(img_size=32, depth=1, reg_tokens=2, class_token=False, global_pool="avg")
        with pytest.raises(ValueError, match=r"VisionTransformer has none: its num_prefix_tokens=2 prefix"):
            covpool.attach_head("vit_tiny_patch16_224", head="sovit", model_kwargs=kwargs)
        vit = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
        x = torch.randn(2, 3, 32, 32)
        tokens = vit.forward_features(x)
        model = covpool.attach_head(vit, head="isqrtcov", num_classes=3, reduction_dim=8).eval()
        torch.testing.assert_close(model(x), model.head(tokens[:, 2:]))  # both registers dropped

    def test_vit_isqrtcov_drops_prefix_tokens(self) -> None:
        vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
        x = torch.randn(2, 3, 32, 32)
        tokens = vit.forward_features(x)
        model = covpool.attach_head(vit, head="isqrtcov", num_classes=3, reduction_dim=8).eval()
        assert model.head.input_format == "NLC"
        torch.testing.assert_close(model(x), model.head(tokens[:, 1:]))

    def test_unreached_parameters_frozen(self) -> None:
        model = covpool.attach_head("convnext_atto", num_classes=3, reduction_dim=8)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        assert frozen == {"backbone.head.norm.weight", "backbone.head.norm.bias"}
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        for name, param in model.named_parameters():
            assert (param.grad is not None) == (name not in frozen), name

    @pytest.mark.parametrize(
        ("model", "kwargs", "match"),
        [
            ("resnet18", dict(head="cov"), "head must be one of"),
            ("resnet18", dict(head="sovit"), r"head='sovit' needs token features.*\(N, C, H, W\)"),
            ("resnet18_isqrtcov", dict(), "already has a covariance head"),
            (
                "vit_tiny_patch16_224",
                dict(head="sovit", model_kwargs=dict(img_size=16, depth=1)),
                r"returns 1 visual token\(s\) \(features of shape \(2, 2, 192\) with 1 prefix",
            ),
            (
                "vit_tiny_patch16_224",
                dict(model_kwargs=dict(img_size=16, depth=1)),
                r"returns 1 visual token\(s\)",
            ),
            (nn.Linear(2, 2), dict(), "lacks 'forward_features'"),
        ],
    )
    def test_errors(self, model, kwargs: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            covpool.attach_head(model, **kwargs)

    def test_channels_last_features_rejected(self) -> None:
        swin_kwargs = dict(img_size=32, window_size=2, embed_dim=8, depths=(1,) * 4, num_heads=(1,) * 4)
        with pytest.raises(ValueError, match=r"returns shape \(2, 1, 1, 64\).*channels-last"):
            covpool.attach_head("swin_tiny_patch4_window7_224", model_kwargs=swin_kwargs)
