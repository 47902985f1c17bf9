"""Layers that must not lose every channel, and the device op that keeps their strongest channel alive.

A layer whose channels all reach 0 bits outputs zeros (its bias and batch-norm shift are gated too). In a plain
feed-forward stack that makes the model's output independent of its input: the model predicts a constant. In a
residual branch it only removes the branch. :func:`output_cutting_layers` finds the first kind by trying it: with a
layer's bit depths set to "dead", is the output still different for different samples? :class:`StrongestHold` then
keeps, after every bit-depth step, the strongest channel of those layers at ``floor`` bits or more (a few vectorised
ops for all layers, no host read).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.pruning.surgery import _normalise_inputs
from lightning_xai.quantization.install import QuantizedLayer

__all__ = ["KEEP_CHOICES", "output_cutting_layers", "StrongestHold", "dead_layers"]

KEEP_CHOICES = ("cut", "all", "none")


def _rows(inputs: Any, n: int) -> tuple[tuple, dict, int]:
    """The first ``n`` samples of an ``(args, kwargs)`` example (tensors sliced along their first dimension)."""
    args, kwargs = _normalise_inputs(inputs)
    sizes = [a.shape[0] for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor) and a.dim() > 0]
    batch = min(sizes) if sizes else 0
    k = min(n, batch)

    def cut(a: Any) -> Any:
        return a[:k] if isinstance(a, Tensor) and a.dim() > 0 else a

    return tuple(cut(a) for a in args), {key: cut(v) for key, v in kwargs.items()}, k


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            found = _first_tensor(item)
            if found is not None:
                return found
    return getattr(out, "logits", None) if not isinstance(out, (list, tuple, dict)) else None


def output_cutting_layers(
    model: nn.Module, layers: Sequence[QuantizedLayer], inputs: Any, samples: int = 2
) -> list[str] | None:
    """Names of the quantized layers whose death (every channel at 0 bits) makes ``model``'s output the same for
    every sample of ``inputs`` (its first ``samples`` rows; evaluation mode, no gradients).

    Returns ``None`` when the test cannot tell (fewer than two samples, no tensor output, samples whose outputs
    already coincide): the caller then treats every layer as one that cuts the output.
    """
    args, kwargs, k = _rows(inputs, samples)
    if k < 2:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            base = _first_tensor(model(*args, **kwargs))
            if base is None or not _varies(base):
                return None
            cutting: list[str] = []
            for layer in layers:
                b = layer.quantizer.b
                saved = b.detach().clone()
                b.data.fill_(-1.0)
                try:
                    out = _first_tensor(model(*args, **kwargs))
                finally:
                    b.data.copy_(saved)
                if out is None or not _varies(out):
                    cutting.append(layer.name)
            return cutting
    finally:
        model.train(was_training)


def _varies(out: Tensor) -> bool:
    """Whether the rows of ``out`` differ (beyond rounding)."""
    flat = out.detach().float().reshape(out.shape[0], -1)
    spread = (flat - flat[:1]).abs().amax()
    scale = flat.abs().amax().clamp(min=1e-6)
    return bool(spread > 1e-5 * scale)


class StrongestHold:
    """Raise the strongest channel of every tensor in ``bits`` to at least ``floor`` bits, in place and without a
    host read: one concatenation, a segment maximum and a split for all layers together (ties keep every tied
    channel). The segment index is built once per set of shapes (it changes only after a removal).

    Example:
        >>> b = [torch.tensor([-1.0, -0.5]), torch.tensor([3.0, -2.0])]
        >>> StrongestHold(2.0)(b)
        >>> [t.tolist() for t in b]
        [[-1.0, 2.0], [3.0, -2.0]]
    """

    def __init__(self, floor: float) -> None:
        self.floor = float(floor)
        self._key: tuple | None = None
        self._segment: Tensor | None = None

    def __call__(self, bits: Sequence[Tensor]) -> None:
        if not bits:
            return
        counts = [int(b.shape[0]) for b in bits]
        device = bits[0].device
        key = (tuple(counts), device)
        if key != self._key or self._segment is None:
            self._segment = torch.repeat_interleave(
                torch.arange(len(bits), device=device), torch.tensor(counts, device=device)
            )
            self._key = key
        with torch.no_grad():
            flat = torch.cat([b.detach() for b in bits])
            top = torch.full((len(bits),), -torch.inf, device=device, dtype=flat.dtype)
            top = top.scatter_reduce(0, self._segment, flat, reduce="amax", include_self=True)
            held = torch.where(flat == top[self._segment], flat.clamp(min=self.floor), flat)
            torch._foreach_copy_([b.data for b in bits], list(held.split(counts)))


def dead_layers(layers: Sequence[QuantizedLayer]) -> list[str]:
    """Names of the quantized layers with no channel above 0 bits (one host read per layer: call at logging or
    removal time, not every step)."""
    return [layer.name for layer in layers if layer.quantizer.b.numel() and not bool((layer.quantizer.b > 0).any())]
