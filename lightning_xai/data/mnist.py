"""The full MNIST (60,000 + 10,000 images) from torchvision's raw files, held in memory, with a seeded validation
split carved from the *training* set (the test set is never touched for model selection).

The IDX files are read with numpy here rather than through ``torchvision.datasets.MNIST``: the whole set fits in
memory as one tensor (47 MB), so batches are slices instead of 60,000 PIL conversions per epoch, and the folder
layout is what torchvision writes (``<root>/MNIST/raw/<file>``), so a folder torchvision downloaded works as is.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_xai._validation import validate_number
from lightning_xai.data.digits import InMemorySplits

__all__ = ["MNISTDataModule", "read_idx", "find_mnist_raw", "MNIST_FILES"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MEAN, STD = 0.1307, 0.3081  # the usual MNIST normalisation (training-set statistics)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX file (``.gz`` or not) as a numpy array (uint8 data; LeCun's format: magic, dims, big-endian sizes).

    Raises ``ValueError`` naming the file when it is not IDX or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:  # type: ignore[operator]
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{str(path)!r} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != count:
        raise ValueError(
            f"{str(path)!r} is truncated or corrupted: its header says {dims} ({count} bytes), "
            f"the file holds {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def find_mnist_raw(data_dir: str | os.PathLike[str]) -> Path:
    """The folder holding MNIST's raw files: ``data_dir/MNIST/raw``, ``data_dir/raw`` or ``data_dir`` itself."""
    root = Path(data_dir)
    for cand in (root / "MNIST" / "raw", root / "raw", root):
        names = {p.name for p in cand.iterdir()} if cand.is_dir() else set()
        if all(f in names or f"{f}.gz" in names for f in MNIST_FILES.values()):
            return cand
    raise FileNotFoundError(
        f"`data_dir`={str(data_dir)!r} holds no MNIST files: expected {sorted(MNIST_FILES.values())} (or their .gz) "
        "in DATA_DIR/MNIST/raw, DATA_DIR/raw or DATA_DIR (torchvision's layout)"
    )


def _decompressed(raw: Path, name: str) -> Path:
    """``raw/name``, decompressed from ``raw/name.gz`` first when only that exists and the folder is writable (else
    the ``.gz`` itself, read in memory)."""
    plain, packed = raw / name, raw / f"{name}.gz"
    if plain.is_file():
        return plain
    if os.access(raw, os.W_OK):
        tmp = raw / f".{name}.tmp"
        with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, plain)
        return plain
    return packed


class MNISTDataModule(InMemorySplits):
    """Full MNIST with a seeded, stratified validation split taken from the 60,000 training images.

    Args:
        data_dir: a folder with MNIST's raw files in torchvision's layout (``DATA/MNIST/raw``); ``.gz`` files are
            decompressed into it when only those exist (read in memory when it is read-only).
        batch_size: training batch size (evaluation uses 4× that).
        val_size: training images held out for validation (stratified by class, seeded); ``None`` holds out one
            twelfth (5,000 of the full 60,000; proportionally fewer for a smaller folder). The test set is the
            official 10,000.
        seed: split and shuffling seed.
        flatten: yield ``(784,)`` vectors (for LeNet-300-100) instead of ``(1, 28, 28)`` images.
        limit: use only the first ``limit`` training images (smoke runs); ``None`` uses all 60,000.

    Raises:
        ValueError: at ``setup`` when a split would be empty (e.g. ``val_size`` ≥ the number of training images),
            naming the sizes.

    Example:
        >>> dm = MNISTDataModule("DATA", val_size=5000)  # doctest: +SKIP
        >>> dm.setup(); len(dm.dataset("train")), len(dm.dataset("val")), len(dm.dataset("test"))  # doctest: +SKIP
        (55000, 5000, 10000)
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        batch_size: int = 128,
        val_size: int | None = None,
        seed: int = 0,
        flatten: bool = False,
        limit: int | None = None,
    ) -> None:
        super().__init__(batch_size, 0.1, 0.1, seed)
        if not isinstance(data_dir, (str, os.PathLike)):
            raise ValueError(f"`data_dir` must be a folder path, got {data_dir!r}")
        validate_number("val_size", val_size, low=1, integer=True, allow_none=True)
        validate_number("limit", limit, low=2, integer=True, allow_none=True)
        if not isinstance(flatten, bool):
            raise ValueError(f"`flatten` must be True or False, got {flatten!r}")
        self.data_dir = os.fspath(data_dir)
        self.val_size = None if val_size is None else int(val_size)
        self.flatten = flatten
        self.limit = limit
        self.input_shape: tuple[int, ...] = (784,) if flatten else (1, 28, 28)

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        raw = find_mnist_raw(self.data_dir)
        arrays = {key: read_idx(_decompressed(raw, name)) for key, name in MNIST_FILES.items()}
        x_train, y_train = arrays["train_images"], arrays["train_labels"].astype(np.int64)
        if x_train.shape[0] != y_train.shape[0] or arrays["test_images"].shape[0] != arrays["test_labels"].shape[0]:
            raise ValueError(f"MNIST files under {str(raw)!r} disagree on the number of images and labels")
        if self.limit is not None:
            x_train, y_train = x_train[: self.limit], y_train[: self.limit]
        n = x_train.shape[0]
        val_size = max(1, round(n / 12)) if self.val_size is None else self.val_size
        if not 0 < val_size < n:
            raise ValueError(
                f"`val_size`={val_size} leaves no training images: the training files under {str(raw)!r} hold "
                f"{n} images, so `val_size` must be between 1 and {n - 1}"
            )
        from sklearn.model_selection import train_test_split

        counts = np.bincount(y_train)
        stratify = y_train if counts[counts > 0].min() >= 2 and val_size >= len(counts[counts > 0]) else None
        train_idx, val_idx = train_test_split(
            np.arange(n), test_size=val_size, stratify=stratify, random_state=self.seed
        )
        self.indices = {"train": np.sort(train_idx), "val": np.sort(val_idx)}
        shape = (-1, 784) if self.flatten else (-1, 1, 28, 28)

        def tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
            x = (torch.from_numpy(images.astype(np.float32) / 255.0) - MEAN) / STD
            return TensorDataset(x.reshape(shape), torch.from_numpy(labels.astype(np.int64)))

        for split, ids in self.indices.items():
            self._data[split] = tensors(x_train[ids], y_train[ids])
        self._data["test"] = tensors(arrays["test_images"], arrays["test_labels"])
        self.indices["test"] = np.arange(len(self._data["test"]))
        sizes = {split: len(data) for split, data in self._data.items()}
        if min(sizes.values()) == 0:  # e.g. an empty test file
            raise ValueError(f"MNIST under {str(raw)!r} gives an empty split: sizes {sizes}")
