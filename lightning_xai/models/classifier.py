"""A plain classification LightningModule: nothing in it knows about compression."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.models.nets import build_model

__all__ = ["ImageClassifier"]


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier around ``net`` (an ``nn.Module`` or a reference-model name), trained with Adam.

    Logs ``train/loss``, ``val/loss``, ``val/acc`` and ``test/acc``.
    """

    def __init__(
        self,
        net: nn.Module | str = "lenet",
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        **net_kwargs: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"] if isinstance(net, nn.Module) else None)
        self.net = build_model(net, tuple(input_shape), num_classes, **net_kwargs) if isinstance(net, str) else net
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def _eval(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y))
        self.log(f"{prefix}/acc", (logits.argmax(1) == y).float().mean(), prog_bar=prefix == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
