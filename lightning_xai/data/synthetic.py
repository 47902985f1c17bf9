"""A synthetic multi-class dense dataset in the spirit of the LRP paper's "multi" set.

The paper gives no generator, so this is our definition: scikit-learn's ``make_classification`` with
``n_classes=6`` classes of ``2`` Gaussian clusters each, ``20`` features of which ``12`` informative, ``4`` linear
combinations of those and ``4`` noise, ``class_sep=1.5``, ``1 %`` flipped labels, ``6,000`` samples, seeded; features
standardised with the training split's statistics. Non-linear (clusters per class), small, offline.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import make_classification
from torch.utils.data import TensorDataset

from lightning_xai.data.digits import InMemorySplits, stratified_split

__all__ = ["SyntheticMultiDataModule"]


class SyntheticMultiDataModule(InMemorySplits):
    """Stratified train/val/test splits of the synthetic "multi" set (see the module docstring).

    Example:
        >>> dm = SyntheticMultiDataModule(n_samples=600)
        >>> x, y = dm.dataset("train").tensors
        >>> tuple(x.shape[1:]), int(y.max()) + 1
        ((20,), 6)
    """

    num_classes = 6

    def __init__(
        self,
        batch_size: int = 64,
        n_samples: int = 6000,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)
        if not isinstance(n_samples, int) or n_samples < 60:
            raise ValueError(f"`n_samples` must be an integer >= 60, got {n_samples!r}")
        self.n_samples = n_samples
        self.input_shape: tuple[int, ...] = (20,)

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        x, y = make_classification(
            n_samples=self.n_samples,
            n_features=20,
            n_informative=12,
            n_redundant=4,
            n_classes=self.num_classes,
            n_clusters_per_class=2,
            class_sep=1.5,
            flip_y=0.01,
            random_state=self.seed,
        )
        x = x.astype(np.float32)
        self.indices = stratified_split(y, self.val_fraction, self.test_fraction, self.seed)
        train = self.indices["train"]
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        xt = torch.from_numpy((x - mean) / std)
        yt = torch.from_numpy(y.astype(np.int64))
        for split, ids in self.indices.items():
            sel = torch.from_numpy(ids)
            self._data[split] = TensorDataset(xt[sel], yt[sel])
