"""Checkpoints of compressed and pruned models, the Lightning way.

* ``checkpoint["state_dict"]`` holds a **plain, full-size** state dict (:func:`padded_state_dict`): quantized weights
  as their values, removed channels back in place as zeros. ``YourModule.load_from_checkpoint(path)`` on a fresh
  instance of your class therefore works and computes exactly what the compressed model computed.
* ``checkpoint["lightning_xai"]`` keeps the training state itself (compact shapes, quantizer parameters, which
  original channels each tensor kept), so a run resumed with the callbacks continues exactly: a load-state-dict
  pre-hook, registered in ``setup`` (before Lightning restores a checkpoint), swaps it in and resizes the layers to its
  shapes before the values are copied.
* Under ``strategy="ddp_spawn"`` the weights Lightning ships back to the main process (whose model never saw the
  callbacks) are the plain, full-size ones too.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_xai._compile import eager_hooks
from lightning_xai._validation import check_layer_names
from lightning_xai.callbacks._checks import refuse_duplicates, refuse_sharded_strategies
from lightning_xai.pruning.surgery import padded_state_dict, resize_to_state_dict, restore_layout, tensor_layout

__all__ = ["ResizeOnLoad", "register_resize_hook", "save_plain_checkpoint", "plain_weights_for_spawn"]

_KEY = "lightning_xai"


def _loaded_checkpoint(trainer: Any) -> dict | None:
    # Lightning restores the model before the callbacks, so the model's pre-hook reads the checkpoint Lightning is
    # loading from its checkpoint connector (there is no public hook between the two).
    ckpt = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
    return ckpt if isinstance(ckpt, dict) and ckpt else None


def _resize_hook(trainer_ref: Any, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    if prefix:
        return
    ckpt = _loaded_checkpoint(trainer_ref())
    stash = ckpt.get(_KEY) if ckpt is not None else None
    if stash is not None and set(state_dict) == set(ckpt.get("state_dict", {})):  # type: ignore[union-attr]
        state_dict.clear()
        state_dict.update(stash["state_dict"])
        resize_to_state_dict(module, state_dict)
        restore_layout(module, stash.get("layout", {}))
        return
    resize_to_state_dict(module, state_dict)


def register_resize_hook(trainer: Any, pl_module: nn.Module) -> Any:
    """Register the pre-hook on ``pl_module`` (call in ``setup``); returns its handle.

    The hook holds the trainer by weak reference: a strong one would make ``copy.deepcopy(pl_module)`` (torch-pruning's
    MAC counter, the fit-end callbacks' trial copies) copy the trainer too, which fails under DDP (its strategy holds
    thread locks) and is wasteful everywhere."""
    return pl_module.register_load_state_dict_pre_hook(functools.partial(_resize_hook, weakref.ref(trainer)))


def save_plain_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Put the plain, full-size state dict in ``checkpoint["state_dict"]`` and keep the training state next to it
    (once per checkpoint, whichever callback comes first)."""
    if "state_dict" not in checkpoint or _KEY in checkpoint:
        return
    checkpoint[_KEY] = {"state_dict": checkpoint["state_dict"], "layout": tensor_layout(pl_module)}
    checkpoint["state_dict"] = padded_state_dict(pl_module)


def plain_weights_for_spawn(trainer: Any, pl_module: nn.Module) -> None:
    """Under a spawning launcher, make the next ``state_dict()`` (the weights Lightning sends back to the main
    process, whose model is the original, full-size one) the plain, full-size state; once."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if type(launcher).__name__ != "_MultiProcessingLauncher" or getattr(pl_module, "_lxai_spawn_hook", None):
        return

    def once(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        handle.remove()
        module._lxai_spawn_hook = None  # type: ignore[assignment]
        padded = padded_state_dict(module)
        state_dict.clear()
        state_dict.update({prefix + k: v for k, v in padded.items()})

    handle = pl_module.register_state_dict_post_hook(once)
    pl_module._lxai_spawn_hook = handle  # type: ignore[assignment]


@eager_hooks
class ResizeOnLoad(pl.Callback):
    """Base of the fit-end callbacks that change shapes: the resize hook for the duration of a Trainer run, plain
    full-size checkpoints, and the ``ddp_spawn`` hand-back."""

    _resize_handle: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategies(trainer, type(self).__name__)
        refuse_duplicates(trainer, self)
        ignore = getattr(self, "ignore", ())
        if ignore:
            check_layer_names("ignore", ignore, pl_module)
        if self._resize_handle is None:
            self._resize_handle = register_resize_hook(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._resize_handle is not None:
            self._resize_handle.remove()
            self._resize_handle = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        save_plain_checkpoint(pl_module, checkpoint)
