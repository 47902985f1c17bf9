"""Where fit-end callbacks find their samples: the trainer's own dataloaders.

Analysis subsets are chosen by index on the CPU; only the chosen samples are gathered (and later moved to the
device batch by batch by the code that evaluates them), and labels come from ``dataset.targets`` or the label
tensor of a ``TensorDataset`` where one exists, without touching the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset, TensorDataset

__all__ = ["split_dataset", "dataset_tensors", "dataset_labels", "dataset_inputs", "from_rank_zero"]


def split_dataset(trainer: Any, split: str, who: str) -> Any:
    """The map-style dataset behind the trainer's ``"train"`` or ``"val"`` dataloader.

    Raises ``ValueError`` naming ``who`` when there is none or it is empty (an empty loader would otherwise fail
    much later with an unrelated message).
    """
    if split not in ("train", "val"):
        raise ValueError(f"`analysis_split` must be 'train' or 'val', got {split!r}")
    loader = trainer.train_dataloader if split == "train" else trainer.val_dataloaders
    datamodule = getattr(trainer, "datamodule", None)
    if loader is None and datamodule is not None:  # e.g. at fit end, after the fit loop let go of its loaders
        loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if isinstance(loader, dict):
        loader = next(iter(loader.values()))
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"{who} needs a map-style {split} dataset of (input, label) pairs; the {split} loader has none"
        )
    if len(dataset) == 0:
        raise ValueError(f"{who} needs samples from the {split} dataloader, but its dataset is empty (0 samples)")
    return dataset


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


def from_rank_zero(trainer: Any, obj: Any) -> Any:
    """``obj`` as rank 0 has it, on every rank (decisions are taken once and broadcast under DDP). Tensors are sent
    as CPU objects (an object broadcast of a CUDA tensor would land on rank 0's device on every rank)."""
    if getattr(trainer, "world_size", 1) > 1:
        return trainer.strategy.broadcast(_to_cpu(obj), src=0)
    return obj


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_cpu(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(obj, **{f: _to_cpu(getattr(obj, f)) for f in obj.__dataclass_fields__})
    return obj
