"""Small shared helpers for tests."""

import importlib.util
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.evaluation import class_scores
from lightning_xai.quantization.install import QuantizedLayer


def kill_channels(layer: QuantizedLayer, idxs) -> None:
    """Set the bit depth of ``idxs`` to 0 (they then output exactly zero)."""
    with torch.no_grad():
        layer.quantizer.b[list(idxs)] = 0.0


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, saved: dict) -> None:
    now = model.state_dict()
    assert list(now) == list(saved)
    for k, v in saved.items():
        assert now[k].shape == v.shape, k
        assert torch.equal(now[k], v), k


def quiet_trainer(root, callbacks, max_epochs=2, logger=False, **kw) -> pl.Trainer:
    """A deterministic CPU Trainer without progress bars, sanity checks or validation (``limit_val_batches=1.0``
    turns validation back on)."""
    return pl.Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        deterministic=True,
        **{"limit_val_batches": 0, **kw},
    )


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is on ``sys.path``: the scripts import ``_common``)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def halves_task(n: int, side: int, threshold: float) -> DataLoader:
    """``n`` random one-channel ``side × side`` images in batches of 32, three classes: (top half's mean > 0) +
    (bottom half's mean > ``threshold``). Learnable by a small CNN in a few epochs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, side, side, generator=g)
    half = side // 2
    y = (x[:, 0, :half].mean((1, 2)) > 0).long() + (x[:, 0, half:].mean((1, 2)) > threshold).long()
    return DataLoader(TensorDataset(x, y), batch_size=32)


class ClassifierSteps:
    """Mix into a LightningModule: cross-entropy on the class scores of ``self(x)``, an empty validation step (the
    fit-end callbacks read the validation loader themselves), Adam at ``self.lr`` (default 1e-2)."""

    lr = 1e-2

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(class_scores(self(x)), y)

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
