"""Where fit-end callbacks find their samples: the trainer's own dataloaders."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["split_dataset", "dataset_tensors", "from_rank_zero"]


def split_dataset(trainer: Any, split: str, who: str) -> Any:
    """The map-style dataset behind the trainer's ``"train"`` or ``"val"`` dataloader."""
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
    return dataset


def dataset_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """All ``(input, label)`` pairs of a map-style dataset, stacked."""
    xs, ys = zip(*(dataset[i][:2] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(np.asarray(ys), dtype=torch.long)


def from_rank_zero(trainer: Any, obj: Any) -> Any:
    """``obj`` as rank 0 has it, on every rank (decisions are taken once and broadcast under DDP)."""
    if getattr(trainer, "world_size", 1) > 1:
        return trainer.strategy.broadcast(obj, src=0)
    return obj
