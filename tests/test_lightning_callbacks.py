"""CovarianceSpectrumMonitor, FlaggedMatrixMonitor, TrainingHistory, and ZCARecalibration on a user's own
LightningModule (without forward)."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import covpool
from covpool import CovPoolHead, ZCABatchNorm2d, recalibrate_statistics
from covpool.functional.covariance import covariance
from lightning_modules import CovPoolClassifier
from lightning_modules.callbacks import (
    CovarianceSpectrumMonitor,
    FlaggedMatrixMonitor,
    TrainingHistory,
    ZCARecalibration,
    group_covariance,
    spectrum_statistics,
)


class TestSpectrumStatistics:
    def test_known_spectra(self):
        eigenvalues = torch.tensor([[4.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
        rotation = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
        cov = rotation @ torch.diag_embed(eigenvalues) @ rotation.T
        stats = spectrum_statistics(cov)
        p = eigenvalues[0] / eigenvalues[0].sum()
        expected_rank = (math.exp(-(p * p.log()).sum()) + 4.0) / 2
        assert float(stats["condition_number"]) == pytest.approx((4.0 + 1.0) / 2)
        assert float(stats["eig_min"]) == pytest.approx(1.0) and float(stats["eig_max"]) == pytest.approx(4.0)
        assert float(stats["effective_rank"]) == pytest.approx(expected_rank)

    def test_singular_matrix(self):
        v = torch.randn(5, 1, dtype=torch.float64)
        stats = spectrum_statistics(v @ v.T)
        assert float(stats["effective_rank"]) == pytest.approx(1.0)
        assert float(stats["condition_number"]) == pytest.approx(1e12)
        assert float(stats["eig_min"]) >= 0

    def test_bad_shape(self):
        with pytest.raises(ValueError, match="cov"):
            spectrum_statistics(torch.ones(3, 4))

    def test_group_covariance_matches_torch_cov(self):
        x = torch.randn(6, 8, 3, 3, dtype=torch.float64)
        rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
        expected = torch.stack([torch.cov(rows[:, g * 4 : (g + 1) * 4].T, correction=0) for g in range(2)])
        assert torch.allclose(group_covariance(x, 4), expected)


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A CPU trainer without logger, checkpoints, progress bar or summary."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def tiny_loader(n=32, size=32) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=generator), torch.arange(n) % 4)
    return DataLoader(data, batch_size=8)


def test_monitor_logs_every_n_steps_and_removes_hooks(tmp_path):
    torch.manual_seed(0)
    clf = CovPoolClassifier(
        "test_resnet",
        num_classes=4,
        head="isqrtcov",
        head_kwargs={"reduction_dim": 6},
        zca="first",
        model_kwargs={"output_stride": 8},
    )
    head = next(m for m in clf.modules() if isinstance(m, CovPoolHead))
    zca = next(m for m in clf.modules() if isinstance(m, ZCABatchNorm2d))
    seen: dict[int, dict[str, float]] = {}

    class Inspect(L.Callback):
        """Runs after the monitor: records what it logged and checks its hooks are gone."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step - 1] = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("spectrum/")
            }
            assert not head.reduce._forward_hooks and not zca._forward_hooks

    monitor = CovarianceSpectrumMonitor(every_n_steps=2)
    names = monitor.watched_modules(clf)
    assert set(names.values()) == {head, zca}
    head_name = next(n for n, m in names.items() if m is head)

    # independent reference for step 0: the reduced features of the first batch
    # (a train-mode forward: same batch statistics as the first training step)
    first = next(iter(tiny_loader()))[0]
    with torch.no_grad():
        reduced = head.reduce(clf.model.forward_features(first))
    expected = spectrum_statistics(covariance(reduced.flatten(2).transpose(1, 2)))

    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[monitor, Inspect()])
    trainer.fit(clf, train_dataloaders=tiny_loader())
    assert sorted(seen) == [0, 1, 2, 3]
    key = f"spectrum/{head_name}/effective_rank"
    # logged on steps 0 and 2 only (callback_metrics keep the last value between measurements)
    assert key in seen[0] and seen[1][key] == seen[0][key] and seen[2][key] != seen[0][key]
    for stat in ("condition_number", "eig_min", "eig_max", "effective_rank"):
        assert seen[0][f"spectrum/{head_name}/{stat}"] == pytest.approx(float(expected[stat]), rel=1e-4)
    zca_ranks = [v for k, v in seen[0].items() if k.endswith("effective_rank") and k != key]
    assert len(zca_ranks) == 1 and 1.0 <= zca_ranks[0] <= zca.group_size


def test_training_history(tmp_path):
    history = TrainingHistory(monitor=("val/acc1",))
    clf = CovPoolClassifier("test_resnet", num_classes=4)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[history])
    trainer.fit(clf, tiny_loader(16), tiny_loader(8))
    assert [s for s, _ in history.steps] == [1, 2, 3, 4]
    assert len(history.step_times) == 4 and all(t > 0 for t in history.step_times)
    assert [s for s, _ in history.validations] == [2, 4]
    assert all(0 <= v["val/acc1"] <= 1 for _, v in history.validations)


class RootOfABatch(L.LightningModule):
    """Each step takes the square root of a batch of 2 matrices, the second beyond the default bound when
    ``beyond`` (κ = 1e6 where 1e3 is assumed): it is flagged (NaN, counted) and left out of the loss."""

    def __init__(self, beyond: bool) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        conditions = (10.0, 1e6 if beyond else 10.0)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer(
            "A",
            torch.stack(
                [covpool.testing.random_spd(n=8, condition=c, generator=generator) for c in conditions]
            ),
        )

    def training_step(self, batch, batch_idx):
        root = covpool.sqrtm(self.A.float() * self.scale, method="mtp", check_input=False)
        return root[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class TestFlaggedMatrixMonitor:
    @staticmethod
    def fit(tmp_path, monitor: FlaggedMatrixMonitor, beyond: bool) -> dict[int, float]:
        logged: dict[int, float] = {}

        class Read(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if "covpool/flagged_matrices" in trainer.callback_metrics:
                    logged[trainer.global_step] = float(trainer.callback_metrics["covpool/flagged_matrices"])

        covpool.flagged_matrices(reset=True)
        trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[monitor, Read()])
        trainer.fit(
            RootOfABatch(beyond), train_dataloaders=DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2)
        )
        return logged

    def test_flags_are_logged_and_warned_with_what_to_change(self, tmp_path):
        monitor = FlaggedMatrixMonitor(every_n_steps=2)
        with pytest.warns(RuntimeWarning) as warned:
            logged = self.fit(tmp_path, monitor, beyond=True)
        assert logged[2] == 2.0 and logged[4] == 2.0 and monitor.total == 4  # one flagged matrix per step
        messages = [str(w.message) for w in warned if "covpool flagged" in str(w.message)]
        assert messages[0].startswith("covpool flagged 2 matrices (NaN roots) up to step 2 on rank 0")
        assert "eps" in messages[0] and "condition=" in messages[0] and "root='eigh'" in messages[0]
        assert covpool.flagged_matrices() == 0  # read and reset

    def test_no_flag_no_warning(self, tmp_path, recwarn):
        monitor = FlaggedMatrixMonitor(every_n_steps=2)
        assert self.fit(tmp_path, monitor, beyond=False)[2] == 0.0 and monitor.total == 0
        assert not [w for w in recwarn if "covpool flagged" in str(w.message)]

    def test_raise_on_flag_stops_at_the_first_read(self, tmp_path):
        with pytest.raises(RuntimeError, match="covpool flagged 1 matrices .* up to step 1"):
            self.fit(tmp_path, FlaggedMatrixMonitor(every_n_steps=1, raise_on_flag=True), beyond=True)

    @pytest.mark.parametrize("every_n_steps", [0, 1.5])
    def test_bad_every_n_steps(self, every_n_steps):
        with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
            FlaggedMatrixMonitor(every_n_steps=every_n_steps)


class NoForward(L.LightningModule):
    """The plugin use: covpool layers in a module the user wrote, whose steps call ``self.net`` (no
    ``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            ZCABatchNorm2d(8, group_size=4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 4),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TestOwnModule:
    def test_fit_without_forward_with_forward_fn(self, tmp_path):
        torch.manual_seed(0)
        module = NoForward()
        train = tiny_loader(32, size=8)
        calls = []

        def forward_fn(pl_module, batch):
            calls.append(batch[0].shape)
            return pl_module.net(batch[0])

        recalibration = ZCARecalibration(forward_fn=forward_fn)
        trainer = quiet_trainer(
            tmp_path, max_epochs=2, callbacks=[recalibration, FlaggedMatrixMonitor()], num_sanity_val_steps=0
        )
        trainer.fit(module, train, tiny_loader(8, size=8))
        assert trainer.global_step == 8
        # before each of the 2 validations, 4 batches each; fit's end has nothing new to recalibrate
        assert len(calls) == 8 and recalibration.last_counts == {"net.1": 32 * 8 * 8}
        zca = module.net[1]
        fitted = {k: v.clone() for k, v in zca.state_dict().items()}
        # the statistics are those of the final weights over the training data
        recalibrate_statistics(module.net, train, progress=False)
        for key in ("running_mean", "running_cov"):
            assert torch.allclose(fitted[key], zca.state_dict()[key], rtol=1e-5, atol=1e-6)
        assert (
            "val/loss" in trainer.callback_metrics and "covpool/flagged_matrices" in trainer.callback_metrics
        )

    def test_without_forward_or_forward_fn_fit_says_forward_fn(self, tmp_path):
        trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[ZCARecalibration()])
        with pytest.raises(TypeError, match=r"NoForward has no forward.*forward_fn=lambda module, batch"):
            trainer.fit(NoForward(), tiny_loader(8, size=8))

    def test_forward_fn_must_be_callable(self):
        with pytest.raises(TypeError, match="`forward_fn` must be callable"):
            ZCARecalibration(forward_fn="net")

    def test_recalibrate_statistics_without_forward_says_forward_fn(self):
        with pytest.raises(TypeError, match=r"NoForward has no forward.*pass forward_fn="):
            recalibrate_statistics(NoForward(), tiny_loader(8, size=8), progress=False)
        module = NoForward()
        seen = []

        def forward_fn(batch):
            seen.append(batch)
            return module.net(batch[0])

        counts = recalibrate_statistics(
            module, tiny_loader(16, size=8), forward_fn=forward_fn, progress=False
        )
        assert counts == {"net.1": 16 * 8 * 8} and len(seen) == 2 and isinstance(seen[0], list)


@pytest.mark.parametrize("beyond", [False, True])
def test_flagged_matrices_logged_in_a_run_shorter_than_every_n_steps(tmp_path, beyond):
    """3 steps, one epoch, a read every 50 steps: the epoch's end logs the count (one flag per step when
    ``beyond``)."""
    covpool.flagged_matrices(reset=True)
    logger = CSVLogger(tmp_path, name="short")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FlaggedMatrixMonitor()],  # every 50 steps
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        trainer.fit(RootOfABatch(beyond), DataLoader(TensorDataset(torch.zeros(6, 1)), batch_size=2))
    expected = 3.0 if beyond else 0.0
    assert float(trainer.logged_metrics["covpool/flagged_matrices"]) == expected
    flagged = [w for w in warned if "covpool flagged" in str(w.message)]
    assert len(flagged) == beyond and (not beyond or "flagged 3 matrices" in str(flagged[0].message))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("covpool/flagged_matrices")]
    assert [float(row["covpool/flagged_matrices"]) for row in rows] == [expected]
