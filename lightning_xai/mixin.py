"""``CompressionMixin``: the self-compression loss terms made explicit in the user's ``training_step``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["CompressionMixin"]


class CompressionMixin:
    """Mix into a ``LightningModule`` to write the compression objective yourself.

    The quantizers, ``γ`` and ``α`` still come from the :class:`~lightning_xai.callbacks.SelfCompression` callback
    (one implementation); the mixin only moves the penalty into your loss and logs each term as its own scalar
    (``compression/task_loss``, ``compression/q_penalty``, ``compression/l1_penalty``, ``compression/q``).

    Example:
        >>> import lightning as L
        >>> class Model(CompressionMixin, L.LightningModule):
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         task = torch.nn.functional.cross_entropy(self(x), y)
        ...         return self.compressed_loss(task)
    """

    _lxai_compressor: Any = None
    _lxai_penalty_step: int = -1

    def compressed_loss(self, task_loss: Tensor, log: bool = True) -> Tensor:
        """``task_loss + γ·Q + α·L1``; logs the terms when ``log`` is true."""
        return task_loss + self._lxai_penalty(task_loss, log)

    # Run eagerly inside a compiled training_step (`trainer.fit(torch.compile(model))`): the penalty reads Python
    # state that changes every step (the warm-up's scale, the step number, the per-channel weights' cache), which a
    # traced graph would turn into guards and recompile on, step after step, until dynamo gives up on the whole step.
    # Here the graph breaks once, around these few ops; gradients flow through as in eager mode.
    @torch.compiler.disable
    def _lxai_penalty(self, task_loss: Tensor, log: bool) -> Tensor:
        compressor = self._lxai_compressor
        if compressor is None:
            raise RuntimeError(
                "CompressionMixin.compressed_loss() needs the SelfCompression callback: add "
                "`SelfCompression(...)` to `Trainer(callbacks=[...])`; it installs the quantizers and owns gamma/alpha"
            )
        terms = compressor.penalty()
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and getattr(self, "training", False):
            self._lxai_penalty_step = trainer.global_step
        if log and trainer is not None:
            self.log_dict(  # type: ignore[attr-defined]
                {
                    "compression/task_loss": task_loss.detach(),
                    "compression/q_penalty": compressor.gamma * compressor.gamma_scale * terms.q.detach(),
                    "compression/l1_penalty": compressor.alpha * compressor.gamma_scale * terms.l1.detach(),
                    "compression/q": terms.q.detach(),
                },
                on_step=True,
                on_epoch=False,
            )
        return terms.total
