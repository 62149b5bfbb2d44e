"""CovPoolClassifier: model building, optimiser groups, schedule, metrics, checkpoint save/load/resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from covpool import CovPoolHead, ZCABatchNorm2d
from lightning_modules import CovPoolClassifier, DigitsDataModule
from lightning_modules.classifier import warmup_cosine

SMALL = {"model_kwargs": {"output_stride": 8}, "head_kwargs": {"reduction_dim": 8}}


def small_classifier(**kwargs) -> CovPoolClassifier:
    return CovPoolClassifier(
        "test_resnet", num_classes=10, head="isqrtcov", zca="first", **{**SMALL, **kwargs}
    )


def quick_trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**options, **kwargs})


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=16, image_size=32, seed=0)
    dm.setup("fit")
    return dm


class TestBuild:
    def test_head_and_zca_are_attached(self):
        clf = small_classifier()
        assert sum(isinstance(m, CovPoolHead) for m in clf.modules()) == 1
        assert sum(isinstance(m, ZCABatchNorm2d) for m in clf.modules()) == 1
        assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    def test_module_is_not_a_hyperparameter(self):
        net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        clf = CovPoolClassifier(net, num_classes=3)
        assert clf.hparams["model"] is None and clf.model is net
        assert "model" in CovPoolClassifier("test_resnet", num_classes=3).hparams

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"num_classes": 1}, "num_classes"),
            ({"optimizer": "lamb"}, "optimizer"),
            ({"zca": "some"}, "zca"),
            ({"warmup_epochs": -1.0}, "warmup_epochs"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            CovPoolClassifier("test_resnet", **{"num_classes": 10, **kwargs})

    def test_default_digits_give_a_covariance_head_2x2_maps(self):
        # resnet18 has output stride 32; the digits' default 64 px gives 2 x 2 positions, and the head's
        # output depends on the image.
        data = DigitsDataModule(batch_size=4)
        data.setup("fit")
        images, _ = next(iter(data.train_dataloader()))
        clf = CovPoolClassifier("resnet18", head="isqrtcov").eval()
        assert clf.model.forward_features(images).shape == (4, 512, 2, 2)
        pooled = clf.model.forward_head(clf.model.forward_features(images), pre_logits=True)
        assert torch.pdist(pooled).min() > 1e-3  # no two images pool alike

    def test_1x1_maps_fail_at_the_first_batch(self, tmp_path, digits):
        clf = CovPoolClassifier("resnet18", head="isqrtcov")  # 32 px digits, stride 32: 1 x 1 maps
        with pytest.raises(
            ValueError, match=r"CovPoolHead needs .*got shape \(16, 512, 1, 1\).*larger images"
        ):
            quick_trainer(tmp_path, fast_dev_run=1).fit(clf, digits)

    def test_zca_without_batchnorm_raises(self):
        with pytest.raises(ValueError, match="zca.*found no nn.BatchNorm1d or nn.BatchNorm2d in Sequential"):
            CovPoolClassifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), num_classes=3, zca="first")

    def test_pretrained_needs_a_name(self):
        with pytest.raises(ValueError, match="pretrained"):
            CovPoolClassifier(nn.Linear(4, 2), num_classes=2, pretrained=True)


class TestOptimisation:
    def test_head_lr_groups(self, tmp_path):
        clf = small_classifier(lr=0.01, head_lr=0.1, weight_decay=1e-3)
        head = next(m for m in clf.modules() if isinstance(m, CovPoolHead))
        head_ids = {id(p) for p in head.parameters()}
        groups = clf._param_groups()
        for group in groups:
            ids = {id(p) for p in group["params"]}
            assert ids <= head_ids if group["lr"] == 0.1 else not ids & head_ids
            assert all((p.ndim > 1) == (group["weight_decay"] == 1e-3) for p in group["params"])
        assert sum(len(g["params"]) for g in groups) == len(list(clf.parameters()))

    def test_warmup_cosine_values(self):
        factors = [warmup_cosine(s, warmup_steps=4, total_steps=12) for s in range(12)]
        assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
        expected = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
        assert factors[4:] == pytest.approx(expected)

    def test_schedule_is_per_step(self, tmp_path, digits):
        class RecordLR(L.Callback):
            def __init__(self) -> None:
                self.lrs: list[float] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        record = RecordLR()
        clf = CovPoolClassifier("test_resnet", num_classes=10, lr=0.2, warmup_epochs=1.0)
        quick_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[record]).fit(clf, digits)
        expected = [0.2 * warmup_cosine(s, warmup_steps=3, total_steps=6) for s in range(6)]
        assert record.lrs == pytest.approx(expected)


class TestMetrics:
    def test_top_k_clipped_to_num_classes(self):
        clf = CovPoolClassifier(nn.Flatten(), num_classes=3)
        metrics = clf.metrics["val_metrics"]
        assert sorted(metrics.keys()) == ["val/acc1", "val/acc5"]  # a stable name: top-3 of 3 classes
        logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
        metrics.update(logits, torch.tensor([0, 2, 1, 2]))
        values = metrics.compute()
        assert values["val/acc1"] == pytest.approx(0.5) and values["val/acc5"] == pytest.approx(1.0)


class TestCheckpoint:
    def test_module_must_be_passed_again(self, tmp_path, digits):
        def network() -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

        clf = CovPoolClassifier(network(), num_classes=10)
        trainer = quick_trainer(tmp_path, max_steps=1, limit_val_batches=0)
        trainer.fit(clf, digits)
        path = tmp_path / "module.ckpt"
        trainer.save_checkpoint(path)
        with pytest.raises(ValueError, match=r"`model` is None.*load_from_checkpoint\(path, model=MyNet"):
            CovPoolClassifier.load_from_checkpoint(path)
        loaded = CovPoolClassifier.load_from_checkpoint(path, model=network())
        assert all(torch.equal(a, b) for a, b in zip(clf.parameters(), loaded.parameters(), strict=True))

    def test_save_load_and_resume(self, tmp_path, digits):
        L.seed_everything(0)
        clf = small_classifier()
        trainer = quick_trainer(tmp_path)
        trainer.fit(clf, digits)
        path = tmp_path / "one_epoch.ckpt"
        trainer.save_checkpoint(path)

        loaded = CovPoolClassifier.load_from_checkpoint(path)
        saved, restored = clf.state_dict(), loaded.state_dict()
        assert saved.keys() == restored.keys()
        assert all(torch.equal(saved[k], restored[k]) for k in saved)
        images = next(iter(digits.val_dataloader()))[0]
        clf.eval(), loaded.eval()
        with torch.no_grad():
            assert torch.equal(clf(images), loaded(images))

        class CheckStart(L.Callback):
            def on_train_start(self, trainer, pl_module):
                resumed = pl_module.state_dict()
                assert all(torch.equal(saved[k], resumed[k]) for k in saved)
                assert trainer.global_step == 3
                momentum = trainer.optimizers[0].state
                assert momentum and all("momentum_buffer" in s for s in momentum.values())

        resumed = quick_trainer(tmp_path, max_epochs=2, callbacks=[CheckStart()])
        resumed.fit(small_classifier(), digits, ckpt_path=path)
        assert resumed.global_step == 6 and resumed.current_epoch == 2
        assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == 6
