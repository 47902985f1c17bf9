"""Parametrizations that put the quantizer on a layer's ``weight`` and gate its ``bias``.

They are installed with :func:`torch.nn.utils.parametrize.register_parametrization`, so the layer keeps its class
(``isinstance(layer, nn.Conv2d)`` still holds), ``layer.weight`` returns the quantized weight, and ``b``/``e`` are
ordinary parameters of the model: ``configure_optimizers``, DDP and checkpoint restore all see them.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from lightning_xai.quantization.ste import quantize

__all__ = ["ChannelQuantizer", "BiasGate", "initial_exponent"]


def initial_exponent(weight: Tensor, bits: float) -> Tensor:
    """Per-channel exponent so that ``bits``-bit codes cover the channel's largest magnitude.

    ``e = ceil(log2(max|w| / (2^(bits-1) - 1)))``; an all-zero channel gets the exponent of the layer's largest.
    """
    with torch.no_grad():
        amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
        top = max(2.0 ** (bits - 1) - 1, 1.0)
        fallback = amax.max().clamp(min=1e-8)
        amax = torch.where(amax > 0, amax, fallback)
        return torch.ceil(torch.log2(amax / top)).to(weight.dtype)


class ChannelQuantizer(nn.Module):
    """Per-output-channel learnable bit depth ``b`` and exponent ``e`` applied to a weight of shape ``(C, ...)``.

    Args:
        weight: the layer's current weight, used for the channel count and the exponent initialisation.
        init_bits: initial bit depth of every channel (a float; the quantizer learns it).

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = nn.Linear(4, 3)
        >>> _ = parametrize.register_parametrization(layer, "weight", ChannelQuantizer(layer.weight, 8.0))
        >>> layer.parametrizations.weight[0].b.shape
        torch.Size([3])
    """

    def __init__(self, weight: Tensor, init_bits: float = 8.0) -> None:
        super().__init__()
        channels = weight.shape[0]
        self.b = nn.Parameter(torch.full((channels,), float(init_bits), dtype=weight.dtype, device=weight.device))
        self.e = nn.Parameter(initial_exponent(weight, init_bits).to(weight.device))

    def forward(self, weight: Tensor) -> Tensor:
        return quantize(weight, self.b, self.e)

    def alive(self) -> Tensor:
        """Boolean mask of channels with a positive bit depth (the others output exactly zero)."""
        return self.b.detach() > 0

    def extra_repr(self) -> str:
        return f"channels={self.b.numel()}"


class BiasGate(nn.Module):
    """Multiplies the bias by the alive mask of the weight's quantizer, so a 0-bit channel outputs exactly zero.

    The quantizer is held through a weak reference (not a submodule), so ``b``/``e`` are not registered twice and
    deep copies keep the pairing.
    """

    def __init__(self, quantizer: ChannelQuantizer) -> None:
        super().__init__()
        self._quantizer_ref = weakref.ref(quantizer)

    @property
    def quantizer(self) -> ChannelQuantizer:
        q = self._quantizer_ref()
        if q is None:  # pragma: no cover - only if the weight parametrization was dropped by hand
            raise RuntimeError("BiasGate lost its ChannelQuantizer; reinstall the quantizers")
        return q

    def forward(self, bias: Tensor) -> Tensor:
        return bias * self.quantizer.alive().to(bias.dtype)

    def __deepcopy__(self, memo: dict) -> BiasGate:
        import copy

        quantizer = copy.deepcopy(self.quantizer, memo)
        new = BiasGate(quantizer)
        new.train(self.training)
        return new

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_quantizer_ref"] = self.quantizer  # strong reference while pickling
        return state

    def __setstate__(self, state: dict) -> None:
        q = state.pop("_quantizer_ref")
        self.__dict__.update(state)
        self._quantizer_ref = weakref.ref(q)
