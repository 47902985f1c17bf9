"""Honest size accounting: what a packed export really stores.

Per quantized layer, channel ``c`` stores ``k_c · n`` bits, where ``k_c`` is the smallest two's-complement width
holding the channel's integer codes (0 when they are all zero, e.g. a 0-bit channel) and ``n`` the number of
weights per output channel that are still stored (removed channels, and consumer inputs listed in
``dead_inputs``, count zero). Each channel also stores its width (1 byte), its exponent (float32) when
``k_c > 0``, and, for layers with a bias, one flag bit and a float32 bias when the channel is alive (``b > 0``).
Every other parameter and buffer is stored as is. The float32 baseline is the unquantized model's full state dict at
4 bytes a value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_xai.quantization.install import QuantizedLayer, foreign_parametrizations, quantized_layers
from lightning_xai.quantization.ste import bits_needed, quantize_to_int

__all__ = ["LayerSize", "SizeReport", "size_report", "float_state_bytes", "plain_state_items"]

WIDTH_BYTES = 1  # uint8 bit width per channel
EXPONENT_BYTES = 4  # float32 exponent per stored channel
BIAS_BYTES = 4  # float32 bias per stored channel


@dataclass
class LayerSize:
    """Storage of one quantized layer."""

    name: str
    channels: int
    alive_channels: int
    weights_per_channel: int
    bits: torch.Tensor  # stored width per channel (int64)
    weight_bits: int
    overhead_bytes: int
    flag_bits: int = 0

    @property
    def mean_bits(self) -> float:
        return float(self.bits.float().mean()) if self.channels else 0.0


@dataclass
class SizeReport:
    """What the packed export stores, and how that compares with float32."""

    layers: dict[str, LayerSize] = field(default_factory=dict)
    quantized_weight_bits: int = 0
    flag_bits: int = 0
    float_weight_bits: int = 0
    other_bytes: int = 0
    overhead_bytes: int = 0
    float_bytes: int = 0

    @property
    def weight_bytes(self) -> int:
        return math.ceil(self.quantized_weight_bits / 8)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor payload in the packed export."""
        return self.weight_bytes + math.ceil(self.flag_bits / 8) + self.overhead_bytes + self.other_bytes

    @property
    def bits_ratio(self) -> float:
        """Stored weight bits / float32 bits of the same layers before compression."""
        return self.quantized_weight_bits / self.float_weight_bits if self.float_weight_bits else float("nan")

    @property
    def size_ratio(self) -> float:
        """Total stored bytes / float32 bytes of the whole original model."""
        return self.total_bytes / self.float_bytes if self.float_bytes else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            "bits_total": float(self.quantized_weight_bits),
            "bits_ratio": self.bits_ratio,
            "size_ratio": self.size_ratio,
            "bytes_total": float(self.total_bytes),
            "float_bytes": float(self.float_bytes),
        }


def plain_state_items(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as a plain (unparametrized) model would name it, without quantizer parameters.

    Quantized tensors are returned as their *original* float values under their plain name.
    """
    out: dict[str, torch.Tensor] = {}
    # tensors parametrized by something else (weight_norm, spectral_norm, …) keep their keys: a fresh model of the
    # same architecture has those parametrizations and loads their latent tensors (original0, _u, …) as they are
    foreign = {
        f"{name}.parametrizations.{tensor}." if name else f"parametrizations.{tensor}."
        for name, module in model.named_modules()
        for tensor in foreign_parametrizations(module)
    }
    for key, value in model.state_dict(keep_vars=True).items():
        if any(key.startswith(f) for f in foreign):
            out[key] = value
        elif ".parametrizations." in f".{key}":
            prefix, _, rest = f".{key}".partition(".parametrizations.")
            tensor, _, tail = rest.partition(".")
            if tail != "original":
                continue  # b, e of the quantizer
            plain = f"{prefix[1:]}.{tensor}" if prefix[1:] else tensor
            out[plain] = value
        else:
            out[key] = value
    return out


def float_state_bytes(model: nn.Module, shapes: Mapping[str, Sequence[int]] | None = None) -> int:
    """float32 bytes of the plain state dict (4 bytes a value; integer buffers at their own width); ``shapes``: plain
    key → the shape to count a tensor at instead of its own (a model's shapes before channels were removed)."""
    total = 0
    for key, value in plain_state_items(model).items():
        count = math.prod(shapes[key]) if shapes is not None and key in shapes else value.numel()
        total += count * (4 if value.is_floating_point() else value.element_size())
    return total


def _layer_size(layer: QuantizedLayer, dead_inputs: dict[str, torch.Tensor] | None) -> LayerSize:
    original = layer.original.detach()
    q = layer.quantizer
    codes, _ = quantize_to_int(original, q.b.detach(), q.e.detach())
    if dead_inputs is not None and layer.qualified in dead_inputs and original.dim() >= 2:
        keep = ~dead_inputs[layer.qualified].to(torch.bool)
        codes = codes[:, keep]
    k = bits_needed(codes)
    per_channel = int(codes[0].numel()) if codes.shape[0] else 0
    stored = int((k > 0).sum())
    alive = int(q.alive().sum())
    overhead = layer.quantizer.b.numel() * WIDTH_BYTES + stored * EXPONENT_BYTES
    flag_bits = 0
    if layer.bias is not None:
        overhead += alive * BIAS_BYTES
        flag_bits = layer.quantizer.b.numel()
    return LayerSize(
        name=layer.qualified,
        channels=int(codes.shape[0]),
        alive_channels=alive,
        weights_per_channel=per_channel,
        bits=k,
        weight_bits=int((k * per_channel).sum()),
        overhead_bytes=overhead,
        flag_bits=flag_bits,
    )


def size_report(
    model: nn.Module,
    float_weight_count: int | None = None,
    float_bytes: int | None = None,
    dead_inputs: dict[str, torch.Tensor] | None = None,
) -> SizeReport:
    """Account for the storage of ``model`` as :func:`~lightning_xai.quantization.export.export_compressed` writes it.

    Args:
        model: a model with quantizers installed.
        float_weight_count: number of quantized weights before any compression (default: current count).
        float_bytes: float32 bytes of the original model (default: the current plain state at float32).
        dead_inputs: optional ``{qualified tensor name: bool mask over input channels}`` of inputs known to be zero
            (e.g. fed by 0-bit producers not removed yet); their weights are not counted.

    Example:
        >>> from lightning_xai.quantization.install import install_quantizers
        >>> net = nn.Linear(16, 4)
        >>> _ = install_quantizers(net, init_bits=4)
        >>> size_report(net).bits_ratio <= 4 / 32
        True
    """
    report = SizeReport()
    layers = quantized_layers(model)
    quantized_names: set[str] = set()
    for layer in layers:
        ls = _layer_size(layer, dead_inputs)
        report.layers[layer.qualified] = ls
        report.quantized_weight_bits += ls.weight_bits
        report.overhead_bytes += ls.overhead_bytes
        report.flag_bits += ls.flag_bits
        quantized_names.add(layer.qualified)
        if layer.bias is not None:
            quantized_names.add(f"{layer.name}.{layer.bias}" if layer.name else layer.bias)
    current_weights = sum(layer.original.numel() for layer in layers)
    count = current_weights if float_weight_count is None else float_weight_count
    report.float_weight_bits = 32 * int(count)
    for key, value in plain_state_items(model).items():
        if key in quantized_names:
            continue
        report.other_bytes += value.numel() * value.element_size()
    report.float_bytes = float_state_bytes(model) if float_bytes is None else int(float_bytes)
    return report
