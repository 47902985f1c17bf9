"""One logging layer for every callback: scalars to every Lightning logger, histograms/text/images to TensorBoard.

Everything is rank-zero only. Loggers that cannot take histograms, text or images are skipped with a one-time
warning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

__all__ = ["log_scalars", "log_histogram", "log_text", "log_figure", "tensorboard_writers", "flush"]

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        rank_zero_warn(message)


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer`` (none on ranks other than global zero, whose
    loggers hold dummy experiments)."""
    if not getattr(trainer, "is_global_zero", True):
        return []
    writers = []
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_histogram") and hasattr(experiment, "add_scalar"):
            writers.append(experiment)
    return writers


@rank_zero_only
def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at ``step``."""
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in getattr(trainer, "loggers", []) or []:
        logger.log_metrics(clean, step=step)


@rank_zero_only
def log_histogram(trainer: Any, tag: str, values: torch.Tensor, step: int) -> None:
    """Histogram of ``values`` under ``tag`` (TensorBoard only; nothing for an empty tensor, e.g. a layer whose
    channels were all removed — TensorBoard cannot bin zero values)."""
    if values.numel() == 0:
        return
    writers = tensorboard_writers(trainer)
    if not writers and getattr(trainer, "loggers", None):
        _warn_once("histogram", "lightning_xai: histograms are only written to TensorBoard loggers; skipping them")
    for writer in writers:
        writer.add_histogram(tag, values.detach().float().cpu(), global_step=step)


@rank_zero_only
def log_text(trainer: Any, tag: str, text: str, step: int) -> None:
    """Markdown ``text`` under ``tag`` (TensorBoard only)."""
    writers = tensorboard_writers(trainer)
    if not writers and getattr(trainer, "loggers", None):
        _warn_once("text", "lightning_xai: text summaries are only written to TensorBoard loggers; skipping them")
    for writer in writers:
        writer.add_text(tag, text, global_step=step)


@rank_zero_only
def log_figure(trainer: Any, tag: str, figure: Callable[[], Any], step: int) -> None:
    """The matplotlib figure ``figure()`` builds, as an image under ``tag`` (TensorBoard only). The figure is built
    only on global rank zero and only when a TensorBoard logger will take it, and closed afterwards."""
    import matplotlib.pyplot as plt

    writers = tensorboard_writers(trainer)
    if not writers:
        if getattr(trainer, "loggers", None):
            _warn_once("figure", "lightning_xai: figures are only written to TensorBoard loggers; skipping them")
        return
    fig = figure()
    try:
        for writer in writers:
            writer.add_figure(tag, fig, global_step=step, close=False)
    finally:
        plt.close(fig)


@rank_zero_only
def flush(trainer: Any) -> None:
    """Flush every logger (so that event files hold what was logged at fit end)."""
    for logger in getattr(trainer, "loggers", []) or []:
        logger.save()
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "flush"):
            experiment.flush()
