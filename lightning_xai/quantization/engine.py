"""One implementation of self-compression shared by the ``SelfCompression`` callback and ``CompressionMixin``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai._validation import validate_number
from lightning_xai.quantization.install import (
    QuantizedLayer,
    compile_pattern,
    install_quantizers,
    quantized_layers,
)
from lightning_xai.quantization.size import SizeReport, float_state_bytes, size_report

__all__ = ["SelfCompressor", "PenaltyTerms"]


@dataclass
class PenaltyTerms:
    """The compression terms of the objective (all differentiable)."""

    q: Tensor  # average stored bits per original weight
    l1: Tensor  # mean |w| over the original weight count
    total: Tensor  # gamma * q + alpha * l1


class SelfCompressor:
    """Installs learnable bit-depth quantizers and computes ``γ·Q + α·L1``.

    ``Q = Σ_l Σ_c relu(b_lc) · n_l / N0``: the average bit depth per weight of the uncompressed model, where ``n_l``
    is the number of weights per output channel of layer ``l`` (it shrinks when consumers lose inputs) and ``N0``
    the number of quantized weights at install time. ``L1 = Σ |w| / N0`` over the latent float weights.

    Args:
        gamma: weight of the size penalty ``Q``.
        alpha: weight of the L1 penalty.
        init_bits: initial bit depth of every channel.
        include: regex of layer names to quantize (``re.search``); ``None`` selects every Conv/Linear layer.
        exclude: regex of layer names to leave in float.
    """

    def __init__(
        self,
        gamma: float = 0.01,
        alpha: float = 0.0,
        init_bits: float = 8.0,
        include: str | None = None,
        exclude: str | None = None,
    ) -> None:
        validate_number("gamma", gamma, low=0.0)
        validate_number("alpha", alpha, low=0.0)
        validate_number("init_bits", init_bits, low=1.0, high=32.0)
        compile_pattern(include, "include")
        compile_pattern(exclude, "exclude")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.init_bits = float(init_bits)
        self.include = include
        self.exclude = exclude
        self.model: nn.Module | None = None
        self.initial_weights = 0
        self.float_bytes = 0

    # -- installation ---------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> list[QuantizedLayer]:
        """Install quantizers on ``model`` (idempotent) and record its float32 size for the ratios."""
        fresh = not quantized_layers(model)
        if fresh:
            self.float_bytes = float_state_bytes(model)
        layers = install_quantizers(model, self.include, self.exclude, self.init_bits)
        if not layers:
            raise ValueError(
                f"no layer matched: `include`={self.include!r}, `exclude`={self.exclude!r} select none of the "
                "Conv1d/Conv2d/Linear/MultiheadAttention layers of the model"
            )
        if fresh:
            self.initial_weights = sum(layer.original.numel() for layer in layers)
        self.model = model
        return layers

    @property
    def layers(self) -> list[QuantizedLayer]:
        if self.model is None:
            raise RuntimeError("SelfCompressor.install(model) has not been called")
        return quantized_layers(self.model)

    def quant_parameters(self) -> list[nn.Parameter]:
        """Every ``b`` and ``e`` (in layer order)."""
        params: list[nn.Parameter] = []
        for layer in self.layers:
            params += [layer.quantizer.b, layer.quantizer.e]
        return params

    # -- objective ------------------------------------------------------------------------------------------
    def penalty(self) -> PenaltyTerms:
        """``γ·Q + α·L1`` as differentiable tensors."""
        layers = self.layers
        n0 = max(self.initial_weights, 1)
        device = layers[0].quantizer.b.device
        q = torch.zeros((), device=device)
        l1 = torch.zeros((), device=device)
        for layer in layers:
            per_channel = layer.original[0].numel() if layer.original.shape[0] else 0
            q = q + layer.quantizer.b.clamp(min=0).sum() * per_channel
            if self.alpha:
                l1 = l1 + layer.original.abs().sum()
        q = q / n0
        l1 = l1 / n0
        return PenaltyTerms(q=q, l1=l1, total=self.gamma * q + self.alpha * l1)

    def add_penalty_gradients(self, scale: float = 1.0) -> None:
        """Add ``scale · ∇(γ·Q + α·L1)`` to the ``.grad`` of ``b`` (and of the weights if ``alpha > 0``).

        Used by the callback, which cannot change the user's loss. The penalty depends on parameters only, so its
        gradient is exact without a second backward through the network (and DDP hooks are not triggered). It is
        the closed form of :meth:`penalty`'s gradient: ``∂Q/∂b_lc = n_l/N0 · [b_lc > 0]``,
        ``∂L1/∂w = sign(w)/N0``; a test checks it against autograd.
        """
        n0 = max(self.initial_weights, 1)
        with torch.no_grad():
            for layer in self.layers:
                b = layer.quantizer.b
                if self.gamma and b.requires_grad:
                    per_channel = layer.original[0].numel() if layer.original.shape[0] else 0
                    g = (b > 0).to(b.dtype) * (scale * self.gamma * per_channel / n0)
                    if b.grad is None:
                        b.grad = g
                    else:
                        b.grad.add_(g)
                w = layer.original
                if self.alpha and w.requires_grad:
                    g = torch.sign(w) * (scale * self.alpha / n0)
                    if w.grad is None:
                        w.grad = g
                    else:
                        w.grad.add_(g)

    # -- reporting ------------------------------------------------------------------------------------------
    def size(self) -> SizeReport:
        """What the packed export of the current model stores, against the float32 model at install time."""
        if self.model is None:
            raise RuntimeError("SelfCompressor.install(model) has not been called")
        return size_report(self.model, float_weight_count=self.initial_weights, float_bytes=self.float_bytes)

    def state_dict(self) -> dict[str, Any]:
        return {"initial_weights": self.initial_weights, "float_bytes": self.float_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_weights = int(state.get("initial_weights", self.initial_weights))
        self.float_bytes = int(state.get("float_bytes", self.float_bytes))
