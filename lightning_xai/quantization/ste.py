"""The self-compression quantizer ``q(x, b, e)`` with a straight-through estimator.

``q(x, b, e) = 2^e · round(clip(2^-e · x, -2^(b-1), 2^(b-1) - 1))`` per output channel (Cséfalvay & Imber,
arXiv 2301.13142), with ``b`` clamped at 0 so that a channel at ``b ≤ 0`` quantizes to exactly zero.

The forward pass is computed as ``s · r`` with ``s = 2^e`` and ``r`` an exact integer, so the packed export
(integers + scales) reproduces the quantized weights bit for bit. Gradients (STE: ``d round(u)/du := 1``):

* ``∂q/∂x = 1`` where ``x/s`` lies inside the clip range, 0 outside;
* ``∂q/∂e = ln2 · (q − x·[inside])``;
* ``∂q/∂b = ln2 · s · 2^(b−1) · (+1 above, −1 below the range, 0 inside)`` for ``b > 0``, 0 for ``b ≤ 0``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["quantize", "quantize_to_int", "bits_needed", "LN2"]

LN2 = math.log(2.0)


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-output-channel vector ``(C,)`` so it broadcasts over ``like`` of shape ``(C, ...)``."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def _bounds(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    half = torch.exp2(b.clamp(min=0.0) - 1.0)
    return -half, half - 1.0, half


def quantize_to_int(weight: Tensor, b: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """Return the integer codes ``r`` (float tensor holding integers) and per-channel scales ``s = 2^e``.

    ``q(x, b, e) == s[:, None, ...] * r`` exactly. No gradient is tracked.
    """
    with torch.no_grad():
        s = torch.exp2(e)
        lo, hi, _ = _bounds(b)
        u = weight / _expand(s, weight)
        r = torch.round(torch.maximum(torch.minimum(u, _expand(hi, weight)), _expand(lo, weight)))
        # b <= 0 gives the degenerate range [-0.5, -0.5] whose rounding is -0.0; normalise to +0.
        r = r + 0.0
    return r, s


class _QuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, b: Tensor, e: Tensor) -> Tensor:  # type: ignore[override]
        shape = (-1,) + (1,) * (weight.dim() - 1)
        s = torch.exp2(e)
        half = torch.exp2(b.clamp(min=0.0) - 1.0)
        se = s.reshape(shape)
        lo, hi = (-half).reshape(shape), (half - 1.0).reshape(shape)
        u = weight / se
        r = torch.round(torch.clamp(u, lo, hi)).add_(0.0)  # +0.0 turns the -0.0 of a 0-bit channel into +0.0
        out = se * r
        ctx.save_for_backward(weight, b, u, out, lo, hi, s, half)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, b, u, out, lo, hi, s, half = ctx.saved_tensors
        above = u > hi
        below = u < lo
        inside = ~(above | below)
        reduce_dims = tuple(range(1, weight.dim()))
        grad_w = grad * inside if ctx.needs_input_grad[0] else None
        grad_b = grad_e = None
        if ctx.needs_input_grad[2]:
            contrib = torch.where(inside, out - weight, out)
            gc = grad * contrib
            grad_e = LN2 * (gc.sum(dim=reduce_dims) if reduce_dims else gc)
        if ctx.needs_input_grad[1]:
            gs = torch.where(above, grad, torch.where(below, -grad, torch.zeros((), dtype=grad.dtype)))
            g = gs.sum(dim=reduce_dims) if reduce_dims else gs
            grad_b = g * (LN2 * s * half * (b > 0).to(grad.dtype))
        return grad_w, grad_b, grad_e


def quantize(weight: Tensor, b: Tensor, e: Tensor) -> Tensor:
    """Quantize ``weight`` (shape ``(C, ...)``) with per-output-channel bit depth ``b`` and exponent ``e`` (``(C,)``).

    Example:
        >>> w = torch.tensor([[0.30, -0.70], [0.05, 0.02]])
        >>> quantize(w, torch.tensor([3.0, 0.0]), torch.tensor([-2.0, -2.0]))
        tensor([[ 0.2500, -0.7500],
                [ 0.0000,  0.0000]])
    """
    if b.shape != (weight.shape[0],) or e.shape != (weight.shape[0],):
        raise ValueError(
            f"`b` and `e` must have shape ({weight.shape[0]},) to match the output channels of `weight` "
            f"{tuple(weight.shape)}, got {tuple(b.shape)} and {tuple(e.shape)}"
        )
    return _QuantizeSTE.apply(weight, b, e)


def bits_needed(codes: Tensor) -> Tensor:
    """Smallest two's-complement width (per output channel) that holds every integer code of that channel.

    A channel whose codes are all zero needs 0 bits (nothing is stored). ``codes`` has shape ``(C, ...)``.
    """
    flat = codes.reshape(codes.shape[0], -1)
    if flat.shape[1] == 0:
        return torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
    hi = flat.max(dim=1).values
    lo = flat.min(dim=1).values
    # k bits hold [-2^(k-1), 2^(k-1)-1]: need 2^(k-1) >= max(hi + 1, -lo)
    need = torch.maximum(hi + 1.0, -lo).clamp(min=1.0)
    k = torch.ceil(torch.log2(need)).to(torch.int64) + 1
    zero = (flat == 0).all(dim=1)
    return torch.where(zero, torch.zeros_like(k), k)
