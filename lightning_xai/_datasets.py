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

__all__ = [
    "dataset_labels",
    "dataset_inputs",
    "dataset_tensors",
    "split_sample",
    "check_first_sample",
    "INPUT_KEYS",
    "LABEL_KEYS",
]


def dataset_labels(dataset: Any) -> Tensor:
    """The labels of every sample of a map-style dataset of ``(input, label)`` pairs, as a CPU ``int64`` tensor,
    read without loading the inputs where the dataset exposes them (``targets``, a ``TensorDataset``'s second tensor,
    ``Subset`` of those)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
        if labels.dim() != 1:
            raise ValueError(
                "one integer class label per sample is supported (classification); the dataset's labels have shape "
                f"{tuple(labels.shape)}"
            )
        return labels.detach().to("cpu", torch.long)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        labels = torch.as_tensor(np.asarray(targets))
        if labels.dim() == 1:
            return labels.to(torch.long)
    return torch.as_tensor(np.asarray([_label(dataset[i]) for i in range(len(dataset))]), dtype=torch.long)


INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "input_ids")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def split_sample(item: Any) -> tuple[Any, Any]:
    """``(input, label)`` of one dataset sample: a tuple/list ``(input, label, ...)``, or a dict whose input is under
    one of ``INPUT_KEYS`` and label under one of ``LABEL_KEYS`` (the first present). Anything else is a clear error."""
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    if isinstance(item, dict):
        x_key = next((k for k in INPUT_KEYS if k in item), None)
        y_key = next((k for k in LABEL_KEYS if k in item), None)
        if x_key is None or y_key is None:
            raise ValueError(
                f"dict samples need an input under one of {list(INPUT_KEYS)} and a label under one of "
                f"{list(LABEL_KEYS)}; this dataset's samples have keys {sorted(map(str, item))}"
            )
        return item[x_key], item[y_key]
    raise ValueError(
        f"expected (input, label) samples (a tuple, or a dict with {INPUT_KEYS[0]!r}/{LABEL_KEYS[0]!r} keys), got "
        f"{type(item).__name__}"
    )


def _label(item: Any) -> int:
    label = split_sample(item)[1]
    t = torch.as_tensor(label) if not isinstance(label, (list, tuple)) else torch.as_tensor(np.asarray(label))
    if t.numel() != 1 or t.is_floating_point() and not bool(t == t.round()):
        raise ValueError(
            "one integer class label per sample is supported (classification); got a label of shape "
            f"{tuple(t.shape)} and dtype {t.dtype} (sequence or multi-label targets are not)"
        )
    return int(t.reshape(()))


def dataset_inputs(dataset: Any, indices: Sequence[int] | Tensor | np.ndarray) -> Tensor:
    """The inputs of the samples ``indices`` of a map-style dataset, stacked (on the CPU unless the dataset holds
    them elsewhere); only those samples are read."""
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if isinstance(dataset, Subset):
        base = torch.as_tensor(list(dataset.indices), dtype=torch.long)[idx]
        return dataset_inputs(dataset.dataset, base)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][idx.to(dataset.tensors[0].device)]
    return torch.stack([_input(dataset[int(i)]) for i in idx.tolist()])


def _input(item: Any) -> Tensor:
    """The input of one sample as a tensor; a structure of several inputs is a clear error."""
    x = split_sample(item)[0]
    if isinstance(x, (tuple, list, dict)):
        kind = f"a {type(x).__name__} of {len(x)} items"
        raise ValueError(
            f"the analyses take one input tensor per sample (the model's forward is called with it alone); this "
            f"dataset's samples hold {kind} as their input (a model of several inputs is not supported)"
        )
    return torch.as_tensor(x)


def check_first_sample(dataset: Any) -> list[str]:
    """Read sample 0 of ``dataset`` as the analyses will (one input tensor, one integer class label), so that a
    dataset they cannot use is refused before training rather than at fit end. Returns the other keys of a dict
    sample (``attention_mask``, …), which the analyses do not pass to the model."""
    if len(dataset) == 0:
        return []
    item = dataset[0]
    _input(item)
    _label(item)
    if not isinstance(item, dict):
        return []
    used = {next(k for k in INPUT_KEYS if k in item), next(k for k in LABEL_KEYS if k in item)}
    return sorted(str(k) for k in item if k not in used)


def dataset_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """All ``(input, label)`` pairs of a map-style dataset, stacked, where the dataset keeps them (the CPU for every
    dataset the library ships); callers evaluate them in device batches."""
    return dataset_inputs(dataset, np.arange(len(dataset))), dataset_labels(dataset)
