"""Where fit-end callbacks find their samples (the trainer's own dataloaders) and their device.

Analysis subsets are chosen by index on the CPU (:mod:`lightning_xai._datasets`); only the chosen samples are
gathered, and later moved to the device batch by batch by the code that evaluates them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_xai._datasets import check_first_sample, dataset_inputs, dataset_labels, dataset_tensors

__all__ = [
    "split_dataset",
    "check_splits",
    "dataset_tensors",
    "dataset_labels",
    "dataset_inputs",
    "from_rank_zero",
    "on_training_device",
]


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
        raise ValueError(f"{who} needs samples from the `{split}` dataloader, but its dataset is empty (0 samples)")
    return dataset


def check_splits(trainer: Any, splits: tuple[str, ...], who: str) -> None:
    """At training start, refuse a split whose samples the fit-end analysis could not read (several inputs, a label
    that is not one class), naming ``who``; a split whose loader does not exist yet is checked at fit end.

    Dict samples whose other keys name arguments of the model's ``forward`` (a Hugging Face ``attention_mask``) get a
    warning: the analysis calls ``forward`` with the input alone, so it sees, say, padded positions unmasked."""
    forward = getattr(getattr(trainer, "lightning_module", None), "forward", None)
    try:
        accepted = set(inspect.signature(forward).parameters) if forward is not None else set()
    except (TypeError, ValueError):
        accepted = set()
    for split in splits:
        try:
            dataset = split_dataset(trainer, split, who)
        except ValueError:
            continue  # no such loader (yet): fit end says so
        try:
            extra = check_first_sample(dataset)
        except ValueError as err:
            raise ValueError(f"{who} ({split} split): {err}") from None
        passed = [k for k in extra if k in accepted]
        if passed:
            rank_zero_warn(
                f"{who}: the {split} samples also hold {passed}, which the model's forward takes; the analysis calls "
                "forward with the input alone, so it runs without them (e.g. without an attention mask)"
            )


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


@contextlib.contextmanager
def on_training_device(trainer: Any, pl_module: Any) -> Iterator[torch.device]:
    """Run fit-end work on the device the model trained on, and leave the model where Lightning put it.

    Lightning's teardown moves the module and the optimizer states to the CPU *before* ``on_fit_end``
    (``Trainer._run``: ``_teardown()`` then the ``on_fit_end`` hooks), so a fit-end analysis would otherwise run on
    the CPU, slowly, and meet the device tensors it kept from training. The fit-end callbacks run inside this
    context: model and optimizer states go back to ``trainer.strategy.root_device`` for the analysis and return to
    the CPU after it (also when the analysis raises). Yields the device the analysis runs on.
    """
    strategy = getattr(trainer, "strategy", None)
    target = getattr(strategy, "root_device", None)
    current = next((p.device for p in pl_module.parameters()), None)
    if target is None or current is None or torch.device(target) == current:
        yield current if current is not None else torch.device("cpu")
        return
    optimizers = list(getattr(trainer, "optimizers", []) or [])
    pl_module.to(target)
    _optimizers_to_device(optimizers, target)  # Lightning's own helper for its teardown: leaves "step" where it is
    try:
        yield torch.device(target)
    finally:
        pl_module.to(current)
        _optimizers_to_device(optimizers, current)
