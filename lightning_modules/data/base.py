"""Shared pieces of the data modules: seeded stratified splits and the data loaders."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning as L
import numpy as np
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset


def stratified_split(targets: Sequence[int], fractions: Sequence[float], *, seed: int) -> list[np.ndarray]:
    """Split ``range(len(targets))`` into a first part and one part per fraction, stratified by class.

    The same ``targets`` and ``seed`` always give the same indices.

    Shape:
        - targets: (N,)
        - output: ``len(fractions) + 1`` index arrays that partition ``range(N)``

    Example:
        >>> train, val = stratified_split([0, 1] * 10, [0.2], seed=0)
        >>> len(train), len(val), sorted(set(train) | set(val)) == list(range(20))
        (16, 4, True)
    """
    if any(f <= 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be positive and sum to less than 1, got {list(fractions)}")
    targets = np.asarray(targets)
    rest = np.arange(len(targets))
    parts = []
    remaining = 1.0
    for fraction in fractions:
        rest, part = train_test_split(
            rest, test_size=fraction / remaining, random_state=seed, stratify=targets[rest]
        )
        parts.append(np.sort(part))
        remaining -= fraction
    return [np.sort(rest), *parts]


def default_num_workers() -> int:
    """Loader workers when none are asked for: the CPUs this process may use, at most 4.

    More workers than cores only compete with the training process for them.

    Example:
        >>> 1 <= default_num_workers() <= 4
        True
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no CPU affinity
        cpus = os.cpu_count() or 1
    return min(4, cpus)


class ClassificationDataModule(L.LightningDataModule):
    """Base class: holds ``train_set``, ``val_set``, ``test_set`` (filled by ``setup``) and builds loaders.

    Args:
        batch_size: samples per batch (per process under DDP).
        num_workers: loader worker processes; ``None``: :func:`default_num_workers`.
        image_size: side of the square images the model sees.
        seed: seed of the train/val/test split.
    """

    num_classes: int

    def __init__(self, *, batch_size: int, num_workers: int | None, image_size: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        num_workers = default_num_workers() if num_workers is None else num_workers
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0 or None, got {num_workers}")
        if image_size < 1:
            raise ValueError(f"`image_size` must be >= 1, got {image_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not created this split yet")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
