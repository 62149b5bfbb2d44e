"""Data modules: embedded digits, class folders of generated PNGs, CIFAR files in torchvision's format."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from lightning_modules import CIFARDataModule, DigitsDataModule, ImageFolderDataModule
from lightning_modules.data import default_num_workers, stratified_split

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_modules" / "configs"


def all_samples(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.as_tensor(labels)


class TestSplit:
    def test_partition_stratified_and_seeded(self):
        targets = np.repeat(np.arange(4), 50)
        parts = stratified_split(targets, [0.2, 0.1], seed=3)
        assert sorted(np.concatenate(parts).tolist()) == list(range(200))
        assert [len(p) for p in parts] == [140, 40, 20]
        assert all((np.bincount(targets[p]) == len(p) // 4).all() for p in parts)
        again = stratified_split(targets, [0.2, 0.1], seed=3)
        other = stratified_split(targets, [0.2, 0.1], seed=4)
        assert all((a == b).all() for a, b in zip(parts, again, strict=True))
        assert not (parts[1] == other[1]).all()

    def test_bad_fractions(self):
        with pytest.raises(ValueError, match="fractions"):
            stratified_split([0, 1] * 5, [0.6, 0.5], seed=0)


class TestWorkers:
    @pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 2), (16, 4)])
    def test_default_is_the_cpus_at_most_4(self, cpus, expected, monkeypatch, tmp_path):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
        assert default_num_workers() == expected
        write_pngs(tmp_path, ["a", "b"], 1)
        assert ImageFolderDataModule(tmp_path).num_workers == expected
        assert CIFARDataModule(tmp_path).num_workers == expected
        assert ImageFolderDataModule(tmp_path, num_workers=0).num_workers == 0

    def test_without_affinity_uses_cpu_count(self, monkeypatch):
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 3)
        assert default_num_workers() == 3

    def test_negative_rejected(self, tmp_path):
        with pytest.raises(ValueError, match=r"`num_workers` must be >= 0 or None, got -1"):
            CIFARDataModule(tmp_path, num_workers=-1)

    @pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
    def test_shipped_configs_leave_workers_to_the_default(self, config):
        data = yaml.safe_load(config.read_text())["data"]
        assert "num_workers" not in data.get("init_args", {})


class TestDigits:
    def test_shapes_sizes_and_values(self):
        dm = DigitsDataModule(batch_size=32, image_size=24, in_chans=1, seed=0)
        dm.setup("fit")
        sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
        assert sum(sizes) == 1797 and sizes[1] == pytest.approx(0.15 * 1797, abs=1)
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (32, 1, 24, 24) and y.dtype == torch.long
        train_x = dm.train_set.tensors[0]
        assert train_x.mean().abs() < 1e-4 and (train_x.std() - 1).abs() < 1e-4

    def test_images_are_the_packaged_digits(self):
        dm = DigitsDataModule(image_size=8, in_chans=3, val_fraction=0.1, test_fraction=0.1, seed=0)
        dm.setup()
        x, y = all_samples(dm.test_set)
        assert x.shape[1:] == (3, 8, 8) and torch.equal(x[:, 0], x[:, 2])
        reference = load_digits()
        flat = torch.as_tensor(reference.images.reshape(1797, -1) / 16.0, dtype=torch.float32)
        standardised = (flat - flat.mean()) / flat.std()
        # every test image is a packaged digit (up to the train-split standardisation) with its label
        match = torch.cdist(x[:, 0].reshape(len(x), -1), standardised).argmin(dim=1)
        assert torch.equal(torch.as_tensor(reference.target)[match], y)

    def test_split_is_deterministic(self):
        first, second, other = (DigitsDataModule(image_size=16, seed=s) for s in (7, 7, 8))
        for dm in (first, second, other):
            dm.setup()
        assert torch.equal(first.val_set.tensors[1], second.val_set.tensors[1])
        assert torch.equal(first.val_set.tensors[0], second.val_set.tensors[0])
        assert not torch.equal(first.val_set.tensors[0], other.val_set.tensors[0])


def write_pngs(folder, classes, per_class, size=20):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            pixels[..., c % 3] = 255  # a class colour
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


class TestImageFolder:
    def test_train_val_folders(self, tmp_path):
        write_pngs(tmp_path / "train", ["cat", "dog", "owl"], 4)
        write_pngs(tmp_path / "val", ["cat", "dog", "owl"], 2)
        dm = ImageFolderDataModule(tmp_path, batch_size=4, num_workers=0, image_size=16)
        assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "owl"]
        dm.setup("fit")
        assert len(dm.train_set) == 12 and len(dm.val_set) == 6 and dm.test_set is dm.val_set
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (4, 3, 16, 16) and y.max() < 3
        # evaluation transform is deterministic and normalised with ImageNet statistics
        a, b = dm.val_set[0][0], dm.val_set[0][0]
        assert torch.equal(a, b) and a.min() < 0

    def test_split_fraction_without_val_folder(self, tmp_path):
        write_pngs(tmp_path, ["a", "b"], 10)
        dm = ImageFolderDataModule(tmp_path, num_workers=0, image_size=16, val_fraction=0.2, seed=1)
        dm.setup("fit")
        train_idx, val_idx = set(dm.train_set.indices), set(dm.val_set.indices)
        assert len(train_idx) == 16 and len(val_idx) == 4 and not train_idx & val_idx
        again = ImageFolderDataModule(tmp_path, num_workers=0, image_size=16, val_fraction=0.2, seed=1)
        again.setup("fit")
        assert again.val_set.indices == dm.val_set.indices

    def test_mismatched_classes(self, tmp_path):
        write_pngs(tmp_path / "train", ["a", "b"], 2)
        write_pngs(tmp_path / "val", ["a", "c"], 2)
        with pytest.raises(ValueError, match="class folders"):
            ImageFolderDataModule(tmp_path, num_workers=0).setup("fit")

    def test_missing_root(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="root"):
            ImageFolderDataModule(tmp_path / "nothing")


def write_cifar(root, variant, per_batch):
    """Small files in CIFAR's pickled on-disk layout (torchvision's md5 sums cannot match them)."""
    rng = np.random.default_rng(variant)
    folder = root / ("cifar-10-batches-py" if variant == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    label_key = "labels" if variant == 10 else "fine_labels"
    names = (
        ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if variant == 10 else ["train", "test"]
    )
    for name in names:
        count = per_batch * (5 if variant == 100 and name == "train" else 1)
        batch = {
            "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
            label_key: (np.arange(count) % variant).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    meta_name, meta_key = ("batches.meta", "label_names") if variant == 10 else ("meta", "fine_label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(variant)]}, f)


@pytest.mark.parametrize("variant", [10, 100])
def test_cifar_from_files(tmp_path, monkeypatch, variant):
    write_cifar(tmp_path, variant, per_batch=2 * variant)
    # The generated files cannot match torchvision's md5 sums; only the integrity check is bypassed.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    dm = CIFARDataModule(
        tmp_path, variant=variant, batch_size=8, num_workers=0, image_size=40, val_fraction=0.1
    )
    assert dm.num_classes == variant
    dm.prepare_data()  # download=False: touches nothing
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 10 * variant and len(dm.test_set) == 2 * variant
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 40, 40) and int(y.max()) < variant
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_cifar_missing_files(tmp_path):
    with pytest.raises(RuntimeError, match="download=True"):
        CIFARDataModule(tmp_path, num_workers=0).setup("fit")
