"""Measurements shared by the fit-end callbacks and the benchmarks: accuracy, CPU latency, MACs."""

from __future__ import annotations

import contextlib
import io
import time
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

__all__ = ["accuracy", "measure_latency", "latency_ratio", "count_macs"]


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in its current mode, without gradients."""
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            correct += int((model(x[start : start + batch_size]).argmax(-1) == y[start : start + batch_size]).sum())
    return correct / max(1, x.shape[0])


def measure_latency(model: nn.Module, inputs: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one eval-mode forward of ``inputs`` (no grad); the model's mode is restored."""
    was = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                t = time.perf_counter()
                model(inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - t)
    finally:
        model.train(was)
    times.sort()
    return times[len(times) // 2]


def count_macs(model: nn.Module, example: Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one forward of ``example`` (torch-pruning's counter; its stray prints are silenced)."""
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
