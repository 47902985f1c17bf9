"""Reading map-style datasets by index: labels without inputs where the dataset exposes them, inputs only for the
samples asked for. Everything here stays where the dataset keeps it (the CPU for every dataset the library ships);
the code that evaluates the samples moves them to the device batch by batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset, TensorDataset

__all__ = ["dataset_labels", "dataset_inputs", "dataset_tensors"]


def dataset_labels(dataset: Any) -> Tensor:
    """The labels of every sample of a map-style dataset of ``(input, label)`` pairs, as a CPU ``int64`` tensor,
    read without loading the inputs where the dataset exposes them (``targets``, a ``TensorDataset``'s second tensor,
    ``Subset`` of those)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].detach().to("cpu", torch.long)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return torch.as_tensor(np.asarray([_label(dataset[i]) for i in range(len(dataset))]), dtype=torch.long)


def _label(item: Any) -> int:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError(f"expected (input, label) samples, got {type(item).__name__}")
    return int(item[1])


def dataset_inputs(dataset: Any, indices: Sequence[int] | Tensor | np.ndarray) -> Tensor:
    """The inputs of the samples ``indices`` of a map-style dataset, stacked (on the CPU unless the dataset holds
    them elsewhere); only those samples are read."""
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if isinstance(dataset, Subset):
        base = torch.as_tensor(list(dataset.indices), dtype=torch.long)[idx]
        return dataset_inputs(dataset.dataset, base)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][idx.to(dataset.tensors[0].device)]
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in idx.tolist()])


def dataset_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """All ``(input, label)`` pairs of a map-style dataset, stacked, where the dataset keeps them (the CPU for every
    dataset the library ships); callers evaluate them in device batches."""
    return dataset_inputs(dataset, np.arange(len(dataset))), dataset_labels(dataset)
