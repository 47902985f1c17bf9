"""Measurements shared by the fit-end callbacks and the benchmarks: accuracy, CPU latency, MACs."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_xai.quantization.install import detach_hook_weights

__all__ = ["accuracy", "measure_latency", "latency_ratio", "count_macs", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def class_scores(output: Any) -> Tensor:
    """The class scores ``(batch, classes)`` in what a model's forward returned: the tensor itself, the ``logits`` of a
    mapping or of an object (Hugging Face's ``ModelOutput``), or the first element of a tuple/list.

    Example:
        >>> class_scores({"logits": torch.ones(2, 3), "loss": torch.zeros(())}).shape
        torch.Size([2, 3])
    """
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"the model's forward returned {type(output).__name__}; this analysis needs class scores: a (batch, classes) "
        "tensor, a mapping or object with a `logits` tensor, or a tuple whose first element is that tensor"
    )


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in its current mode, without gradients. ``x``/``y`` may live on the
    CPU: each batch is moved to the model's device, and the count stays there until one read at the end."""
    device = model_device(model)
    correct = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device, non_blocking=True)
            yb = y[start : start + batch_size].to(device, non_blocking=True)
            correct += (class_scores(model(xb)).argmax(-1) == yb).sum()
    return int(correct) / max(1, x.shape[0])


def measure_latency(model: nn.Module, inputs: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one eval-mode forward of ``inputs`` (no grad); the model's mode is restored.

    Timed with ``torch.utils.benchmark``, which synchronises CUDA around each measurement (a plain wall clock would
    time kernel launches, not the work)."""
    from torch.utils import benchmark  # imported here: it imports cpp_extension, which logs about CUDA_HOME

    was = model.training
    model.eval()
    timer = benchmark.Timer(stmt="model(inputs)", globals={"model": model, "inputs": inputs})
    try:
        with torch.no_grad():
            if warmup:
                timer.timeit(warmup)
            times = sorted(timer.timeit(1).mean for _ in range(repeats))
    finally:
        model.train(was)
    return times[len(times) // 2]


def count_macs(model: nn.Module, example: Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one forward of ``example`` (torch-pruning's counter; its stray prints are silenced)."""
    detach_hook_weights(model)  # torch-pruning deep-copies the model
    with contextlib.redirect_stdout(io.StringIO()):
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def latency_ratio(original: nn.Module, changed: nn.Module, inputs: Any, rounds: int = 7, repeats: int = 10) -> float:
    """Median over ``rounds`` of latency(changed) / latency(original), the two measured alternately so that the
    machine's drifts hit both alike."""
    ratios = sorted(
        measure_latency(changed, inputs, repeats=repeats) / measure_latency(original, inputs, repeats=repeats)
        for _ in range(rounds)
    )
    return ratios[len(ratios) // 2]
