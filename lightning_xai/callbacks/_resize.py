"""Checkpoints of pruned models load into fresh full-size models: a load-state-dict pre-hook, registered in
``setup`` (before Lightning restores a checkpoint), resizes the layers to the checkpoint's shapes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_xai.callbacks._checks import refuse_sharded_strategies
from lightning_xai.pruning.surgery import resize_to_state_dict

__all__ = ["ResizeOnLoad"]


def _resize_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    if prefix:
        return
    resize_to_state_dict(module, state_dict)


class ResizeOnLoad(pl.Callback):
    """Base of the callbacks that change shapes: register the resize hook for the duration of a Trainer run."""

    _resize_handle: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategies(trainer, type(self).__name__)
        if self._resize_handle is None:
            self._resize_handle = pl_module.register_load_state_dict_pre_hook(_resize_hook)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._resize_handle is not None:
            self._resize_handle.remove()
            self._resize_handle = None
