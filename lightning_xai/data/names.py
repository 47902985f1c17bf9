"""US census names (the ``names`` package) as character-level classification tasks.

* ``first_vs_last`` (default, 2 classes): every first name (female and male lists) against an equal number of last
  names sampled by ``seed`` — about 4,900 names a class.
* ``three_way`` (3 classes): female first / male first / last name, each class the size of the smallest (~1,000).

Names that appear in more than one of the task's classes are dropped (their class is ambiguous). The split is
stratified and deterministic by ``seed``. Characters ``A``–``Z`` map to 1–26, 0 pads; names are truncated to
``max_len``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_xai._validation import validate_number
from lightning_xai.data.digits import InMemorySplits, stratified_split

__all__ = ["NamesDataModule", "load_census_names", "encode_names", "TASKS"]

TASKS = {"first_vs_last": ("first", "last"), "three_way": ("female_first", "male_first", "last")}
_FILES = {"female_first": "dist.female.first", "male_first": "dist.male.first", "last": "dist.all.last"}


def load_census_names() -> dict[str, list[str]]:
    """The three census lists shipped by the ``names`` package (upper-case, in frequency order)."""
    try:
        import names
    except ImportError as err:
        raise ImportError(
            "NamesDataModule needs the optional `names` package: pip install 'lightning_xai[names]' (or `pip install "
            "names`)"
        ) from err
    folder = os.path.dirname(names.__file__)
    out: dict[str, list[str]] = {}
    for cls, fname in _FILES.items():
        with open(os.path.join(folder, fname)) as handle:
            out[cls] = [line.split()[0] for line in handle if line.strip()]
    return out


def encode_names(words: list[str], max_len: int) -> torch.Tensor:
    """``(N, max_len)`` int64 codes: A–Z → 1–26, anything else dropped, 0 pads."""
    out = torch.zeros(len(words), max_len, dtype=torch.long)
    for i, w in enumerate(words):
        codes = [ord(c) - 64 for c in w.upper() if "A" <= c <= "Z"][:max_len]
        out[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
    return out


class NamesDataModule(InMemorySplits):
    """Balanced names task (see the module docstring), stratified train/val/test split, deterministic by ``seed``."""

    vocab_size = 27

    def __init__(
        self,
        batch_size: int = 64,
        max_len: int = 12,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        task: str = "first_vs_last",
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {sorted(TASKS)}, got {task!r}")
        self.task = task
        self.classes = TASKS[task]
        self.num_classes = len(self.classes)
        validate_number("max_len", max_len, low=2, integer=True)
        self.max_len = max_len
        self.input_shape = (max_len,)
        self.words: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        lists = load_census_names()
        if self.task == "first_vs_last":
            lists = {"first": lists["female_first"] + lists["male_first"], "last": lists["last"]}
        classes_of: dict[str, set[str]] = {}
        for cls, words in lists.items():
            for w in words:
                classes_of.setdefault(w, set()).add(cls)
        unique = {cls: sorted({w for w in words if len(classes_of[w]) == 1}) for cls, words in lists.items()}
        per_class = min(len(v) for v in unique.values())
        rng = np.random.default_rng(self.seed)
        words: list[str] = []
        labels: list[int] = []
        for ci, cls in enumerate(self.classes):
            pool = unique[cls]
            pick = np.sort(rng.choice(len(pool), size=per_class, replace=False))
            words += [pool[i] for i in pick]
            labels += [ci] * per_class
        self.words = words
        y = np.asarray(labels)
        self.indices = stratified_split(y, self.val_fraction, self.test_fraction, self.seed)
        x = encode_names(words, self.max_len)
        yt = torch.from_numpy(y).long()
        for split, ids in self.indices.items():
            sel = torch.from_numpy(ids)
            self._data[split] = TensorDataset(x[sel], yt[sel])
