"""scikit-learn's ``load_digits`` (1,797 real 8×8 handwritten digits, shipped inside scikit-learn) as a DataModule."""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_xai._validation import validate_number

__all__ = ["DigitsDataModule", "EpochSeededSampler", "InMemorySplits"]


class EpochSeededSampler(Sampler[int]):
    """Shuffles with ``seed + epoch``: the order of epoch ``k`` is the same in a resumed run as in a straight one.

    Lightning calls ``set_epoch`` before each epoch.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sorted ``train``/``val``/``test`` index arrays, stratified by ``labels`` and deterministic by ``seed``."""
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    share = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(rest, test_size=share, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


class InMemorySplits(pl.LightningDataModule):
    """Shared behaviour of the in-memory data modules: ``dataset(split)`` and seeded loaders.

    Subclasses fill ``self.indices`` and ``self._data`` (a ``TensorDataset`` per split) in ``setup``.
    """

    def __init__(self, batch_size: int, val_fraction: float, test_fraction: float, seed: int) -> None:
        super().__init__()
        validate_number("batch_size", batch_size, low=1, integer=True)
        validate_number("val_fraction", val_fraction, low=0.0, low_open=True, high=0.5)
        validate_number("test_fraction", test_fraction, low=0.0, low_open=True, high=0.5)
        validate_number("seed", seed, low=0, integer=True)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.indices: dict[str, np.ndarray] = {}
        self._data: dict[str, TensorDataset] = {}

    def dataset(self, split: str) -> TensorDataset:
        """The ``train``/``val``/``test`` dataset (set up on first use)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"`split` must be one of 'train', 'val', 'test', got {split!r}")
        self.setup()
        return self._data[split]

    def train_dataloader(self) -> DataLoader:
        data = self.dataset("train")
        return DataLoader(data, batch_size=self.batch_size, sampler=EpochSeededSampler(len(data), self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=self.batch_size * 4)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("test"), batch_size=self.batch_size * 4)


class DigitsDataModule(InMemorySplits):
    """Stratified train/val/test split of scikit-learn's digits, deterministic by ``seed``.

    Images are ``(1, 8, 8)`` floats standardised with the training split's mean and std; labels are 0–9.

    Args:
        batch_size: training batch size (evaluation uses 4× that).
        val_fraction: fraction of all samples for validation.
        test_fraction: fraction of all samples for test.
        seed: split and shuffling seed.
        flatten: yield ``(64,)`` vectors instead of ``(1, 8, 8)`` images (for MLPs).

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), int(y.max()) <= 9
        ((32, 1, 8, 8), True)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        flatten: bool = False,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)
        self.flatten = flatten
        self.input_shape: tuple[int, ...] = (64,) if flatten else (1, 8, 8)

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        digits = load_digits()
        x = digits.data.astype(np.float32)
        y = digits.target.astype(np.int64)
        self.indices = stratified_split(y, self.val_fraction, self.test_fraction, self.seed)
        train = self.indices["train"]
        mean, std = x[train].mean(), x[train].std()
        xt = torch.from_numpy((x - mean) / std)
        xt = xt if self.flatten else xt.reshape(-1, 1, 8, 8)
        yt = torch.from_numpy(y)
        for split, ids in self.indices.items():
            sel = torch.from_numpy(ids)
            self._data[split] = TensorDataset(xt[sel], yt[sel])
