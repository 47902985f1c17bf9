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


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-output-channel dot products ``Σ_i a[c, i]·b[c, i]`` in one pass without a temporary (a batched matmul):
    on the CPU a fresh weight-sized temporary costs more than the arithmetic (page faults)."""
    c = a.shape[0]
    return torch.bmm(a.flatten(1).unsqueeze(1), b.flatten(1).unsqueeze(2)).view(c)  # also with no channels left


class _QuantizeSTE(torch.autograd.Function):
    """Forward ``s·round(clamp(w, lo·s, hi·s)/s)`` (= ``s·round(clamp(w/s, lo, hi))``: ``s`` is a power of two, so the
    scaling is exact): one weight-sized allocation and 4 passes. The backward allocates two weight-sized tensors (its
    mask and the weight gradient) and reduces with batched dot products; nothing reads a value back to the host.
    Every tensor follows ``weight``/``b``; ``b``/``e`` may be float32 while ``weight`` is half precision (``*-true``
    precision): the arithmetic runs in the promoted dtype and the result is cast back to ``weight``'s dtype (exact for
    the bit depths a half-precision mantissa holds)."""

    @staticmethod
    def forward(ctx, weight: Tensor, b: Tensor, e: Tensor) -> Tensor:  # type: ignore[override]
        shape = (-1,) + (1,) * (weight.dim() - 1)
        alive = b > 0
        s = torch.exp2(e)
        hs = torch.exp2(b.clamp(min=0.0) - 1.0) * s  # the range in weight units: [-half·s, (half-1)·s]
        # a 0-bit channel gets the range [0, 0], so its codes are +0 (the formula's [-0.5, -0.5] rounds to -0)
        lo, hi = torch.where(alive, -hs, 0.0).view(shape), torch.where(alive, hs - s, 0.0).view(shape)
        sv = s.view(shape)
        out = torch.clamp(weight, lo, hi).div_(sv).round_().mul_(sv)
        ctx.save_for_backward(weight, out, lo, hi, hs, alive)
        return out if out.dtype == weight.dtype else out.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, out, lo, hi, hs, alive = ctx.saved_tensors
        w = weight if weight.dtype == out.dtype else weight.to(out.dtype)  # half weights: compute in b/e's dtype
        if grad.dtype != out.dtype:
            grad = grad.to(out.dtype)
        d = torch.clamp(w, lo, hi).sub_(w)  # < 0 above the range, > 0 below, 0 inside
        grad_in = torch.where(d == 0, grad, 0.0)
        grad_w = grad_in.to(weight.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad_e = None
        rows = weight.dim() > 1
        if ctx.needs_input_grad[2]:  # ln2·Σ g·(q − w·[inside])
            ge = _rowdot(grad, out) - _rowdot(grad_in, w) if rows else grad * out - grad_in * w
            grad_e = ge * LN2
        if ctx.needs_input_grad[1]:  # ln2·s·2^(b−1)·Σ g·(+1 above, −1 below), 0 for b ≤ 0
            d.sign_()
            gs = _rowdot(grad, d) if rows else grad * d
            grad_b = gs * (hs * alive) * -LN2
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
    flat = codes.flatten(1)  # (rows, per-row values), also with no rows left
    if flat.shape[1] == 0:
        return torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
    hi = flat.max(dim=1).values
    lo = flat.min(dim=1).values
    # k bits hold [-2^(k-1), 2^(k-1)-1]: need 2^(k-1) >= max(hi + 1, -lo)
    need = torch.maximum(hi + 1.0, -lo).clamp(min=1.0)
    k = torch.ceil(torch.log2(need)).to(torch.int64) + 1
    zero = (flat == 0).all(dim=1)
    return torch.where(zero, torch.zeros_like(k), k)
