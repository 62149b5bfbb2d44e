"""Checkpoints of a CovPoolClassifier with ZCA layers hold the statistics fit produced: the last one reloads
to the model in memory (same eval logits, bit for bit), and every one holds ZCA statistics recalibrated for
its own weights, with and without validation, and mid-epoch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from covpool import recalibrate_statistics
from covpool.layers.recalibrate import zca_layers
from lightning_modules import CovPoolClassifier

SMALL = {"model_kwargs": {"output_stride": 8}, "head_kwargs": {"reduction_dim": 6}}


def classifier() -> CovPoolClassifier:
    return CovPoolClassifier("test_resnet", num_classes=4, head="isqrtcov", zca="all", lr=0.1, **SMALL)


def loader(n: int, seed: int) -> DataLoader:
    """Not shuffled, so that a recalibration on it sees the batches the callback saw, in the same order."""
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=generator), torch.arange(n) % 4)
    return DataLoader(data, batch_size=8)


ZCA_NAMES = [  # the running statistics of every ZCA layer, by state_dict key
    f"{name}.{buffer}" for name in zca_layers(classifier()) for buffer in ("running_mean", "running_cov")
]


def zca_statistics(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: state_dict[k] for k in ZCA_NAMES}


def recalibrated(state_dict: dict[str, torch.Tensor], train: DataLoader) -> dict[str, torch.Tensor]:
    """The ZCA statistics of these weights over ``train``, as the callback computes them (50 batches)."""
    model = classifier()
    model.load_state_dict(state_dict)
    recalibrate_statistics(model, train, max_batches=50, progress=False)
    return zca_statistics(model.state_dict())


CASES = {
    "validation": ({"every_n_epochs": 1}, True),
    "no_validation": ({"every_n_epochs": 1}, False),
    "mid_epoch": ({"every_n_train_steps": 2}, False),  # steps 2 and 6 are mid-epoch
    "weights_only": ({"every_n_epochs": 1, "save_weights_only": True}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoints_hold_the_statistics_of_their_weights(tmp_path, case):
    checkpoint_kwargs, validate = CASES[case]
    L.seed_everything(0)
    clf = classifier()
    assert len(zca_layers(clf)) > 1
    train, val = loader(32, seed=0), loader(16, seed=1)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, **checkpoint_kwargs
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[checkpoints],
        default_root_dir=tmp_path,
    )
    trainer.fit(clf, train, val if validate else None)
    assert trainer.global_step == 8
    assert torch.load(checkpoints.last_model_path, weights_only=False)["global_step"] == 8

    # The last checkpoint is the model fit returned: the same eval logits, bit for bit.
    last = CovPoolClassifier.load_from_checkpoint(checkpoints.last_model_path)
    images = next(iter(val))[0]
    clf.eval(), last.eval()
    with torch.no_grad():
        assert torch.equal(clf(images), last(images))
    memory = clf.state_dict()
    assert all(torch.equal(memory[k], v) for k, v in last.state_dict().items())

    # Every checkpoint holds the statistics recalibrated for its own weights.
    paths = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(paths) == (5 if case == "mid_epoch" else 3), [p.name for p in paths]  # 2 or 4, and last
    saved = {p.name: torch.load(p, weights_only=False)["state_dict"] for p in paths}
    steps = {name: torch.load(tmp_path / "ckpt" / name, weights_only=False)["global_step"] for name in saved}
    for name, state_dict in saved.items():
        stored, expected = zca_statistics(state_dict), recalibrated(state_dict, train)
        assert stored.keys() == expected.keys() and len(stored) == 2 * len(zca_layers(clf))
        for key in stored:
            assert torch.allclose(stored[key], expected[key], rtol=1e-5, atol=1e-6), (name, key)
    # ... and not those of other weights: the check above tells checkpoints apart.
    first, *_, final = sorted(saved, key=lambda name: steps[name])
    assert steps[first] < steps[final]
    other = recalibrated(saved[final], train)
    assert any(
        not torch.allclose(zca_statistics(saved[first])[k], other[k], rtol=1e-3, atol=1e-4) for k in other
    )
