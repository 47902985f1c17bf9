"""MNIST / Fashion-MNIST / CIFAR-10 through torchvision, for users with a network or with the files on disk."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_xai._validation import validate_number
from lightning_xai.data.digits import DigitsDataModule, EpochSeededSampler

__all__ = ["VisionDataModule", "make_datamodule", "DATASETS"]

_STATS = {
    "mnist": ((0.1307,), (0.3081,), (1, 28, 28)),
    "fashion_mnist": ((0.2860,), (0.3530,), (1, 28, 28)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (3, 32, 32)),
}
DATASETS = ("digits",) + tuple(_STATS)


class VisionDataModule(pl.LightningDataModule):
    """A torchvision image-classification set with a seeded train/val split of its training part.

    Args:
        name: ``mnist``, ``fashion_mnist`` or ``cifar10``.
        data_dir: folder holding (or receiving) the torchvision files.
        download: try to download when the files are missing.
        batch_size: training batch size.
        val_size: training samples held out for validation.
        seed: split and shuffling seed.

    Raises:
        RuntimeError: when the files are missing and cannot be downloaded (e.g. offline), with the fix.
    """

    num_classes = 10

    def __init__(
        self,
        name: str,
        data_dir: str,
        download: bool = True,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if name not in _STATS:
            raise ValueError(f"`name` must be one of {sorted(_STATS)}, got {name!r}")
        validate_number("batch_size", batch_size, low=1, integer=True)
        validate_number("val_size", val_size, low=1, integer=True)
        self.name, self.data_dir, self.download = name, data_dir, download
        self.batch_size, self.val_size, self.seed = batch_size, val_size, seed
        self.input_shape = _STATS[name][2]
        self._data: dict[str, Dataset[Any]] = {}

    def _dataset(self, train: bool) -> Dataset[Any]:
        import torchvision
        from torchvision import transforms

        cls = {
            "mnist": torchvision.datasets.MNIST,
            "fashion_mnist": torchvision.datasets.FashionMNIST,
            "cifar10": torchvision.datasets.CIFAR10,
        }[self.name]
        mean, std, _ = _STATS[self.name]
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        try:
            return cls(self.data_dir, train=train, download=False, transform=tf)
        except RuntimeError:
            if not self.download:
                raise RuntimeError(self._missing_message("downloading is disabled")) from None
        try:
            return cls(self.data_dir, train=train, download=True, transform=tf)
        except Exception as err:  # noqa: BLE001 - urllib/ssl/socket errors differ by platform
            raise RuntimeError(self._missing_message(f"the download failed: {type(err).__name__}: {err}")) from None

    def _missing_message(self, why: str) -> str:
        cls = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}[self.name]
        return (
            f"{self.name} was not found under `data_dir`={self.data_dir!r} and {why}. This machine may be offline: "
            f'download it where a network is available (e.g. `python -c "import torchvision; '
            f"torchvision.datasets.{cls}"
            f"('DIR', download=True)\"`), copy DIR here and pass `--data-dir DIR`; or use the offline default "
            f"`--dataset digits`."
        )

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        full = self._dataset(train=True)
        if not 0 < self.val_size < len(full):  # type: ignore[arg-type]
            raise ValueError(
                f"`val_size`={self.val_size} leaves no training images: {self.name} under {self.data_dir!r} has "
                f"{len(full)} training images, so `val_size` must be between 1 and {len(full) - 1}"  # type: ignore[arg-type]
            )
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(full), generator=g).tolist()  # type: ignore[arg-type]
        self._data["val"] = Subset(full, perm[: self.val_size])
        self._data["train"] = Subset(full, perm[self.val_size :])
        self._data["test"] = self._dataset(train=False)

    def train_dataloader(self) -> DataLoader:
        data = self._data["train"]
        return DataLoader(data, batch_size=self.batch_size, sampler=EpochSeededSampler(len(data), self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._data["val"], batch_size=self.batch_size * 2)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._data["test"], batch_size=self.batch_size * 2)


def make_datamodule(
    name: str = "digits", data_dir: str | None = None, batch_size: int = 64, seed: int = 0, flatten: bool = False
) -> pl.LightningDataModule:
    """The data module for ``name`` (``digits`` works offline; the others need ``data_dir``)."""
    if name == "digits":
        return DigitsDataModule(batch_size=batch_size, seed=seed, flatten=flatten)
    if name not in _STATS:
        raise ValueError(f"`dataset` must be one of {list(DATASETS)}, got {name!r}")
    if data_dir is None:
        raise ValueError(
            f"`data_dir` is required for dataset {name!r}: pass --data-dir pointing at torchvision's files"
        )
    if name == "mnist":  # read from the raw files in memory (offline; a smaller folder gets a proportionate split)
        from lightning_xai.data.mnist import MNISTDataModule

        return MNISTDataModule(data_dir, batch_size=batch_size, seed=seed, flatten=flatten)
    return VisionDataModule(name, data_dir, batch_size=batch_size, seed=seed)
