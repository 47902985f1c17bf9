"""Small shared helpers for tests."""

import torch
from torch import nn

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
