"""covpool.recalibrate_statistics and the ZCARecalibration callback: the recalibrated running statistics
equal the exact float64 mean and unbiased covariance of everything each layer saw, nothing else changes,
clear errors, the callback's wiring in CovPoolClassifier, and 2 gloo processes against one."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from einops import rearrange
from gloo_ranks import run_on_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import covpool
from covpool import ZCABatchNorm1d, ZCABatchNorm2d, recalibrate_statistics
from covpool.layers.recalibrate import default_batch_input, zca_layers
from lightning_modules import CovPoolClassifier, FlaggedMatrixMonitor, ZCARecalibration
from lightning_modules.callbacks import _own_iterator_loader

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


def _net(dtype: torch.dtype = torch.float64, *, batchnorm: bool = True) -> nn.Module:
    """Conv, BatchNorm, ZCA 2d, then tokens through a ZCA 1d layer: every kind of layer the pass touches."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
            self.zca = ZCABatchNorm2d(8, group_size=4, eps=1e-3)
            self.drop = nn.Dropout(0.0)
            self.proj = nn.Linear(8, 6)
            self.zca_tokens = ZCABatchNorm1d(6, group_size=3, eps=1e-3)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            y = self.zca(torch.relu(self.bn(self.conv(x))))
            tokens = self.zca_tokens(self.proj(rearrange(self.drop(y), "n c h w -> n (h w) c")))
            return self.head(tokens.mean(1))

    return Net().to(dtype)


def _batches(sizes=(5, 7, 3), dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Uneven batches with different means, so a mean of batch covariances would differ from the exact one."""
    return [
        (torch.randn(n, 3, 6, 6, dtype=dtype) * (1 + i) + 2.0 * i, torch.zeros(n, dtype=torch.long))
        for i, n in enumerate(sizes)
    ]


def _rows_of(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "n c h w -> (n h w) c") if x.ndim == 4 else x.reshape(-1, x.shape[-1])


def _exact_statistics(model: nn.Module, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and unbiased group covariance in float64 of every ZCA layer's inputs, model in train mode."""
    model = copy.deepcopy(model).train()
    rows: dict[str, list[torch.Tensor]] = {}
    for name, layer in zca_layers(model).items():
        layer.register_forward_pre_hook(
            lambda m, args, name=name: rows.setdefault(name, []).append(_rows_of(m, args[0]).double())
        )
    with torch.no_grad():
        for x in inputs:
            model(x)
    expected = {}
    for name, layer in zca_layers(model).items():
        data = torch.cat(rows[name])
        groups = rearrange(data, "m (G g) -> G g m", g=layer.group_size)
        expected[name] = (data.mean(0), torch.stack([torch.cov(group, correction=1) for group in groups]))
    return expected


def _assert_exact(model, expected, dtype):
    for name, layer in zca_layers(model).items():
        mean, cov = expected[name]
        assert (layer.running_mean.double() - mean).abs().max() <= TOLERANCE[dtype], name
        assert (layer.running_cov.double() - cov).abs().max() <= TOLERANCE[dtype] * cov.abs().max(), name


class TestExactStatistics:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_running_statistics_equal_float64_statistics_of_all_data(self, dtype):
        model, data = _net(dtype), _batches(dtype=dtype)
        expected = _exact_statistics(model, [x for x, _ in data])
        counts = recalibrate_statistics(model, data, progress=False)
        assert counts == {"zca": (5 + 7 + 3) * 16, "zca_tokens": (5 + 7 + 3) * 16}
        _assert_exact(model, expected, dtype)
        assert all(int(layer.num_batches_tracked) == 3 for layer in zca_layers(model).values())

    def test_max_batches_sees_only_the_first_batches(self):
        model, data = _net(), _batches()
        expected = _exact_statistics(model, [x for x, _ in data[:2]])
        assert recalibrate_statistics(model, data, max_batches=2, progress=False)["zca"] == 12 * 16
        _assert_exact(model, expected, torch.float64)

    def test_independent_of_the_starting_statistics(self):
        model, data = _net(), _batches()
        fresh = copy.deepcopy(model)
        with torch.no_grad():
            model.zca.running_cov.mul_(7.0)
            model.zca.running_mean.add_(3.0)
        recalibrate_statistics(model, data, progress=False)
        recalibrate_statistics(fresh, data, progress=False)
        assert torch.equal(model.zca.running_cov, fresh.zca.running_cov)
        assert torch.equal(model.zca.running_mean, fresh.zca.running_mean)

    def test_eval_uses_the_new_statistics(self):
        """The cached evaluation whitening is dropped: eval output equals a model loaded with the buffers."""
        model, data = _net(), _batches()
        x = data[0][0]
        before = model.eval()(x)
        recalibrate_statistics(model, data, progress=False)
        after = model(x)
        reloaded = _net()
        reloaded.load_state_dict(model.state_dict())
        assert not torch.allclose(before, after)
        assert torch.allclose(after, reloaded.eval()(x), atol=1e-12)

    def test_batchnorm_recalibrated_on_request(self):
        model, data = _net(), _batches()
        inputs = []
        hook = model.bn.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        recalibrate_statistics(model, data, batchnorm=True, progress=False)
        hook.remove()
        rows = torch.cat([rearrange(x, "n c h w -> (n h w) c") for x in inputs[: len(data)]])
        assert torch.allclose(model.bn.running_mean, rows.mean(0), atol=1e-10)
        assert torch.allclose(model.bn.running_var, rows.var(0, correction=1), atol=1e-10)
        assert int(model.bn.num_batches_tracked) == 3


class TestNothingElseChanges:
    def test_other_buffers_parameters_and_modes_restored(self):
        model, data = _net(), _batches()
        model.train()
        with torch.no_grad():
            model(data[0][0] + 5)  # BatchNorm running statistics away from their initial values
        model.eval()
        model.bn.train()  # a mixed set of modes
        modes = {name: m.training for name, m in model.named_modules()}
        buffers = {name: b.clone() for name, b in model.named_buffers() if not name.startswith("zca")}
        parameters = {name: p.clone() for name, p in model.named_parameters()}
        recalibrate_statistics(model, data, progress=False)
        assert {name: m.training for name, m in model.named_modules()} == modes
        for name, value in model.named_buffers():
            if not name.startswith("zca"):
                assert torch.equal(value, buffers[name]), name
        for name, value in model.named_parameters():
            assert torch.equal(value, parameters[name]), name

    def test_layers_without_running_statistics_are_skipped(self):
        model = nn.Sequential(
            ZCABatchNorm2d(4, group_size=2, track_running_stats=False), ZCABatchNorm2d(4, group_size=2)
        )
        assert set(recalibrate_statistics(model, [torch.randn(4, 4, 3, 3)], progress=False)) == {"1"}

    def test_failure_midway_restores_every_buffer(self):
        model, data = _net(), _batches()
        state = copy.deepcopy(model.state_dict())

        def fail_on_third(batch):
            if batch[0].shape[0] == 3:
                raise RuntimeError("boom")
            return batch[0]

        with pytest.raises(RuntimeError, match="boom"):
            recalibrate_statistics(model, data, batch_to_input=fail_on_third, progress=False)
        assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
        assert not model.zca._forward_pre_hooks


class TestBatchesAndErrors:
    def test_tensor_and_dict_batches(self):
        model, data = _net(), _batches()
        expected = _exact_statistics(model, [x for x, _ in data])
        recalibrate_statistics(copy.deepcopy(model), [x for x, _ in data], progress=False)
        recalibrate_statistics(
            model, [{"image": x} for x, _ in data], batch_to_input=lambda b: b["image"], progress=False
        )
        _assert_exact(model, expected, torch.float64)

    def test_data_loader_and_progress_bar(self, capsys):
        model = _net(torch.float32)
        loader = DataLoader(TensorDataset(torch.randn(20, 3, 6, 6), torch.zeros(20)), batch_size=8)
        assert recalibrate_statistics(model, loader, device="cpu")["zca"] == 20 * 16

    def test_unexpected_batch_names_what_it_saw(self):
        with pytest.raises(TypeError, match=r"dict with keys \['image', 'label'\].*batch_to_input"):
            recalibrate_statistics(_net(), [{"image": 1, "label": 2}], progress=False)
        with pytest.raises(TypeError, match="first element is str"):
            default_batch_input(("path.png", torch.zeros(1)))

    def test_model_without_zca_layer(self):
        with pytest.raises(ValueError, match="no ZCABatchNorm1d/ZCABatchNorm2d layer.*update_bn"):
            recalibrate_statistics(
                nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), [torch.zeros(2, 3, 4, 4)]
            )

    def test_empty_loader_leaves_the_model_unchanged(self):
        model = _net()
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match="yielded no batch"):
            recalibrate_statistics(model, [], progress=False)
        assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())

    def test_bad_max_batches(self):
        with pytest.raises(ValueError, match="max_batches"):
            recalibrate_statistics(_net(), _batches(), max_batches=0)

    def test_layer_off_the_forward_path(self):
        class Skips(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unused = ZCABatchNorm2d(4, group_size=2)

            def forward(self, x):
                return x

        model = Skips()
        with pytest.raises(RuntimeError, match="forward path"):
            recalibrate_statistics(model, [torch.zeros(2, 4, 3, 3)], progress=False)

    def test_exported_at_top_level(self):
        assert covpool.recalibrate_statistics is recalibrate_statistics


# The Lightning callback, on a tiny timm ResNet (seconds).


def _loader(n=24, size=32, batch_size=8, **kwargs) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(n, 3, size, size, generator=generator), torch.arange(n) % 4)
    return DataLoader(dataset, batch_size=batch_size, **kwargs)


def _classifier(**kwargs) -> CovPoolClassifier:
    torch.manual_seed(0)
    return CovPoolClassifier("test_resnet", num_classes=4, zca="first", lr=0.1, **kwargs)


def _trainer(tmp_path: Path, callbacks=None, **kwargs) -> L.Trainer:
    kwargs = {"max_epochs": 1, **kwargs}
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


class TestCallback:
    def test_classifier_adds_it_and_fit_ends_with_exact_statistics(self, tmp_path):
        clf, loader = _classifier(), _loader()
        trainer = _trainer(tmp_path, limit_train_batches=3, limit_val_batches=0)
        trainer.fit(clf, train_dataloaders=loader)
        callback = next(c for c in trainer.callbacks if isinstance(c, ZCARecalibration))
        assert callback.last_counts and callback._calibrated_at == trainer.global_step == 3
        # with the final weights, over the 3 training batches the trainer allows
        _assert_exact(clf, _exact_statistics(clf, [x for x, _ in list(loader)[:3]]), torch.float32)

    def test_validation_sees_recalibrated_statistics(self, tmp_path):
        clf, loader = _classifier(), _loader()
        checks = []

        class Check(L.Callback):
            def on_validation_epoch_start(self, trainer, pl_module):
                expected = _exact_statistics(pl_module, [x for x, _ in list(loader)[:2]])
                _assert_exact(pl_module, expected, torch.float32)
                checks.append(trainer.global_step)

        callbacks = [ZCARecalibration(max_batches=2), Check()]
        trainer = _trainer(tmp_path, callbacks=callbacks, limit_train_batches=3, limit_val_batches=1)
        trainer.fit(clf, train_dataloaders=loader, val_dataloaders=loader)
        assert checks == [3]

    def test_training_is_the_same_with_and_without_it(self, tmp_path):
        """Recalibration changes no weight and draws no random number of the training (shuffled loader)."""
        weights = []
        for recalibrate in (True, False):
            clf, loader = _classifier(recalibrate_zca=recalibrate), _loader(shuffle=True)
            L.seed_everything(0)
            trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
            trainer.fit(clf, train_dataloaders=loader, val_dataloaders=_loader())
            ran = any(isinstance(c, ZCARecalibration) and c.last_counts for c in trainer.callbacks)
            assert ran == recalibrate
            weights.append({name: p.detach().clone() for name, p in clf.named_parameters()})
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    def test_switch_off_and_models_without_zca(self, tmp_path):
        for clf in (_classifier(recalibrate_zca=False), CovPoolClassifier("test_resnet", num_classes=4)):
            clf.trainer = _trainer(tmp_path)
            assert [type(c) for c in clf.configure_callbacks()] == [FlaggedMatrixMonitor]

    def test_a_trainer_callback_takes_its_place(self, tmp_path):
        clf, loader = _classifier(), _loader()
        mine = ZCARecalibration(max_batches=1)
        trainer = _trainer(tmp_path, callbacks=[mine], limit_train_batches=2, limit_val_batches=0)
        trainer.fit(clf, train_dataloaders=loader)
        assert [c for c in trainer.callbacks if isinstance(c, ZCARecalibration)] == [mine]
        assert mine.last_counts == {"model.conv1.1": 8 * 16 * 16}  # one batch of 8 images at 16x16

    def test_not_in_validate_or_sanity_check(self, tmp_path):
        clf, loader = _classifier(), _loader()
        trainer = _trainer(tmp_path, limit_val_batches=1)
        trainer.validate(clf, loader)
        callback = next(c for c in trainer.callbacks if isinstance(c, ZCARecalibration))
        assert callback.last_counts == {}

    def test_persistent_workers_get_their_own_loader(self):
        loader = _loader(num_workers=1, persistent_workers=True)
        own = _own_iterator_loader(loader)
        assert own is not loader and not own.persistent_workers
        assert own.batch_sampler is loader.batch_sampler and own.dataset is loader.dataset
        plain = _loader()
        assert _own_iterator_loader(plain) is plain

    def test_bad_max_batches(self):
        with pytest.raises(ValueError, match="max_batches"):
            ZCARecalibration(max_batches=0)


# Two gloo processes: every rank recalibrates on its shard; the statistics are those of the union.

WORLD_SIZE = 2
SHARDS = ((5, 2), (3, 6))  # per rank, the batch sizes of its 2 batches (uneven across ranks)


def _shards() -> tuple[nn.Module, list[list[torch.Tensor]]]:
    torch.manual_seed(1)
    model = _net(batchnorm=False)  # BatchNorm is per rank under DDP; the ZCA layers synchronise
    return model, [
        [torch.randn(n, 3, 6, 6, dtype=torch.float64) + i for i, n in enumerate(s)] for s in SHARDS
    ]


def _on_rank(rank: int) -> dict:
    model, shards = _shards()
    counts = recalibrate_statistics(model, shards[rank], progress=False)
    results = {"counts": counts, "state": model.state_dict()}
    try:  # uneven batch counts are refused on every rank, before any batch runs
        recalibrate_statistics(model, shards[rank][: rank + 1], progress=False)
    except ValueError as error:
        results["uneven"] = str(error)
    return results


@pytest.mark.ddp
def test_ddp_statistics_are_those_of_the_union(tmp_path):
    ranks = run_on_ranks(_on_rank, tmp_path, WORLD_SIZE)
    model, shards = _shards()
    # One process on the union batch of each step: the ZCA layers synchronise every batch in training.
    union = [torch.cat([shards[rank][step] for rank in range(WORLD_SIZE)]) for step in range(2)]
    expected = _exact_statistics(model, union)
    rows = sum(sum(SHARDS, ())) * 16
    for results in ranks:
        assert results["counts"] == {"zca": rows, "zca_tokens": rows}
        model.load_state_dict(results["state"])
        _assert_exact(model, expected, torch.float64)
        assert "between 1 and 2 batches" in results["uneven"]
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
