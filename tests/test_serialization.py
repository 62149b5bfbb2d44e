"""Saving and restoring covpool models: safetensors files (plain, and through timm's loaders) and Lightning
checkpoints read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
from torch import nn

from covpool import ZCABatchNorm1d, ZCABatchNorm2d, convert_zca_batchnorm
from covpool.testing import random_spd
from lightning_modules import CovPoolClassifier, DigitsDataModule


@pytest.fixture(scope="module")
def st():
    return pytest.importorskip("safetensors.torch")


class EveryLayer(nn.Module):
    """resnet18_isqrtcov with a ZCA stem, a So-ViT and a ZCABatchNorm1d on the summed logits."""

    def __init__(self) -> None:
        super().__init__()
        resnet = timm.create_model("resnet18_isqrtcov", num_classes=6, reduction_dim=8)
        self.resnet = convert_zca_batchnorm(resnet, layers="first", group_size=16)
        self.vit = timm.create_model(
            "vit_small_patch16_224_sovit", num_classes=6, img_size=32, depth=1, reduction_dim=8
        )
        self.zca = ZCABatchNorm1d(6, group_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.zca(self.resnet(x) + self.vit(x))


def _trained(model: nn.Module, steps: int = 2) -> nn.Module:
    """Perturb every parameter and run ``steps`` training forwards: no tensor keeps its initial value."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        model.train()
        for _ in range(steps):
            model(torch.randn(4, 3, 32, 32))
    return model.eval()


def _differing(restored: nn.Module, original: nn.Module) -> list[str]:
    """Names of the state tensors that differ (the two state dicts must have the same keys)."""
    expected, actual = original.state_dict(), restored.state_dict()
    assert actual.keys() == expected.keys()
    return [name for name in expected if not torch.equal(actual[name], expected[name])]


class TestSafetensors:
    def test_every_parameter_and_buffer_round_trips(self, st, tmp_path) -> None:
        model = _trained(EveryLayer())
        running_cov = model.resnet.bn1.running_cov
        assert not torch.equal(running_cov, torch.eye(16).expand_as(running_cov))
        assert model.zca.num_batches_tracked.item() == 2
        st.save_model(model, tmp_path / "model.safetensors")

        torch.manual_seed(1)
        restored = EveryLayer().eval()
        assert len(_differing(restored, model)) == len(model.state_dict())
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            restored(x)  # fills the ZCA layers' evaluation caches, which loading must invalidate
            st.load_model(restored, tmp_path / "model.safetensors")
            assert _differing(restored, model) == []
            assert torch.equal(restored(x), model(x))

    def test_shared_and_non_contiguous_tensors(self, st, tmp_path) -> None:
        def build() -> nn.Sequential:
            model = nn.Sequential(
                ZCABatchNorm2d(8, group_size=4), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 8)
            )
            model[3].weight = model[2].weight  # tied weights share one storage
            return model

        model = build()
        with torch.no_grad():
            model[0].running_cov = random_spd(2, n=4, dtype=torch.float32).mT  # a non-contiguous buffer
            model[2].weight.normal_()
        assert not model[0].running_cov.is_contiguous()
        with pytest.raises(RuntimeError, match="share memory"):
            st.save_file(model.state_dict(), tmp_path / "plain.safetensors")
        st.save_model(model, tmp_path / "model.safetensors")

        restored = build()
        st.load_model(restored, tmp_path / "model.safetensors")
        assert _differing(restored, model) == []
        assert restored[3].weight is restored[2].weight

    @pytest.mark.parametrize(
        ("name", "kwargs"),
        [
            ("resnet18_isqrtcov", dict(reduction_dim=8)),
            ("vit_small_patch16_224_sovit", dict(reduction_dim=8, img_size=32, depth=1)),
        ],
    )
    def test_timm_loads_the_file(self, st, tmp_path, name: str, kwargs: dict) -> None:
        model = _trained(timm.create_model(name, **kwargs), steps=1)
        path = tmp_path / "model.safetensors"
        st.save_model(model, path)
        for source in (
            dict(checkpoint_path=str(path)),  # a whole covpool checkpoint
            dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))),  # same num_classes as saved
        ):
            assert _differing(timm.create_model(name, **kwargs, **source), model) == []


def test_lightning_checkpoint_loads_with_weights_only(tmp_path) -> None:
    clf = CovPoolClassifier(
        "test_resnet",
        num_classes=10,
        head="isqrtcov",
        zca="first",
        model_kwargs={"output_stride": 8},
        head_kwargs={"reduction_dim": 8, "root": "mtp"},
        zca_kwargs={"group_size": 8, "root": "eigh"},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(clf, DigitsDataModule(batch_size=8, image_size=32, seed=0))
    (path,) = tmp_path.glob("**/*.ckpt")  # written by the default ModelCheckpoint, callback state included

    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["callbacks"] and checkpoint["optimizer_states"]
    restored = CovPoolClassifier(**checkpoint["hyper_parameters"])
    restored.load_state_dict(checkpoint["state_dict"])
    assert _differing(restored, clf) == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), clf.eval()(x))
