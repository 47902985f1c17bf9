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
import threading
import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["quantize", "quantize_to_int", "bits_needed", "LN2"]

LN2 = math.log(2.0)


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-output-channel vector ``(C,)`` so it broadcasts over ``like`` of shape ``(C, ...)``."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def channels_last(t: Tensor) -> bool:
    """Whether ``t`` is a 4-D tensor in the channels_last layout (and not also plain contiguous, as when H = W = 1)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def rows(t: Tensor, cl: bool) -> Tensor:
    """``t`` as ``(C, N)``: one row per output channel. With ``cl`` (the weight is channels_last) each row lists the
    channel's values in that layout's order, ``(H, W, C_in)``, which is a view of a channels_last ``t`` (a copy of any
    other); the per-channel quantizer does not care about the order inside a row, only that every tensor of one call
    uses the same one."""
    return t.permute(0, 2, 3, 1).flatten(1) if cl else t.flatten(1)


def unrows(t: Tensor, shape: torch.Size, cl: bool) -> Tensor:
    """The inverse of :func:`rows` for a tensor ``t`` holding ``shape.numel()`` values in that order: a channels_last
    view of shape ``shape`` with ``cl``, a contiguous one without."""
    if cl:
        return t.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    return t.view(shape)


def _half(b: Tensor) -> Tensor:
    """``2^(max(b, 0) − 1)``: half of a channel's code range (``b ≤ 0``: ½, the degenerate range)."""
    return torch.exp2(b.clamp(min=0.0) - 1.0)


def _bounds(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    half = _half(b)
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


# Reused CPU workspaces for the backward's temporaries (one per thread and dtype, as large as the largest layer
# seen, up to _WORKSPACE_MAX_BYTES). Written by hand because a fresh weight-sized CPU tensor costs its page faults
# (cloning ResNet-50's weights: ≈ 30 ms, copying into existing memory: ≈ 11 ms) and the backward needs two such
# temporaries per layer; PyTorch's CPU allocator does not cache. GPUs (caching allocator, asynchronous streams) and
# larger layers get fresh tensors, and so does a traced graph (torch.compile fuses the temporaries away).
_WORKSPACES = threading.local()
_WORKSPACE_MAX_BYTES = 64 * 2**20


def _workspace(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A tensor shaped like ``like`` (and, channels_last or not, laid out like it) to write a temporary into; its
    contents must not escape the caller."""
    n = like.numel()
    if like.device.type != "cpu" or n * dtype.itemsize > _WORKSPACE_MAX_BYTES or torch.compiler.is_compiling():
        return torch.empty_like(like, dtype=dtype)
    pool = _WORKSPACES.__dict__.setdefault("pool", {})
    buf = pool.get(dtype)
    if buf is None or buf.numel() < n:
        buf = pool[dtype] = torch.empty(n, dtype=dtype, device=like.device)
    return unrows(buf[:n], like.shape, channels_last(like))


def _rowsum(t: Tensor) -> Tensor:
    """Per-output-channel sums of ``t`` (shape ``(C, ...)``) as a fresh ``(C,)`` tensor, also with no channels left."""
    return t.flatten(1).sum(1) if t.dim() > 1 else t.clone()


# The fused path: the same arithmetic on 2-D views ``(C, N)``, compiled by torch.compile (inductor) into one C++
# loop forward and one backward (with the per-channel sums), instead of eager's ≈ 10 weight-sized passes and two
# temporaries. Measured on ResNet-50's 54 layers (2 CPU cores), forward + backward through this Function: ≈ 77 ms
# fused, ≈ 130 ms eager (≈ 185 ms before the eager backward's workspace); the bare kernels alone take ≈ 45 ms.
# The kernels also compute the per-channel ranges (from eager 2^e and 2^(b⁺−1): a compiled exp2 rounds differently)
# and hand them to the backward: forward of the 54 layers ≈ 3–5 ms faster, backward ≈ 3–11 ms (three alternated
# runs in one process, BENCHMARKS.md `overhead` notes).
# Used for float32 CPU layers of at least _FUSE_MIN_NUMEL weights when ``fused=True`` and nothing else is compiling;
# a failed compile (no C++ toolchain, …) warns once and leaves the eager path to every later call.
_FUSE_MIN_NUMEL = 4096
_FUSED: dict[str, object] = {}


def _ranges(b: Tensor, s: Tensor, half: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The clamp range ``[lo, hi]`` in weight units, ``[-half·s, (half-1)·s]``, and ``b``'s gradient factor
    ``−ln2·s·half·[b > 0]`` from ``s = 2^e`` and ``half = 2^(b⁺−1)``. A 0-bit channel gets the range ``[0, 0]``, so
    its codes are +0 (the formula's ``[-0.5, -0.5]`` rounds to −0). Traced into the fused kernels as well (products
    and selections: exact in any order of evaluation; the powers of two come from eager ``exp2``, whose rounding a
    compiled kernel need not reproduce)."""
    alive = b > 0
    hs = half * s
    return torch.where(alive, -hs, 0.0), torch.where(alive, hs - s, 0.0), torch.where(alive, hs, 0.0) * -LN2


def _forward_math(w: Tensor, b: Tensor, s: Tensor, half: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused forward on rows ``w`` ``(C, N)`` with per-channel ``(C, 1)`` columns: the range is computed inside
    the kernel instead of by channel-sized eager ops per layer, and returned with ``b``'s gradient factor for the
    backward."""
    lo, hi, factor = _ranges(b, s, half)
    return torch.round(torch.clamp(w, lo, hi) / s) * s, lo, hi, factor


def _backward_math(
    grad: Tensor, w: Tensor, out: Tensor, lo: Tensor, hi: Tensor, factor: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused backward: the weight gradient and the finished ``b``/``e`` gradients (``(C,)`` each)."""
    d = torch.clamp(w, lo, hi) - w
    grad_in = torch.where(d == 0, grad, 0.0)
    grad_b = (grad * torch.sign(d)).sum(1) * factor.squeeze(1)
    grad_e = (grad * out - grad_in * w).sum(1) * LN2
    return grad_in, grad_b, grad_e


def _fusable(weight: Tensor, b: Tensor) -> bool:
    return (
        not _FUSED.get("broken", False)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and b.dtype == torch.float32
        and weight.dim() > 1
        and weight.numel() >= _FUSE_MIN_NUMEL
        and not torch.compiler.is_compiling()
    )


def _alone(t: Tensor) -> Tensor:
    """``t`` as a tensor of its own (same memory, no autograd history, and not a view): a view hands torch.compile
    its base's sizes and strides to guard on too, and removals that change a layer's shape then recompiled the kernels
    for every new base (ResNet-50 with removals reached dynamo's limit of 8 graphs, after which the kernels ran
    eagerly); on the rows alone the dynamic shapes need about two graphs each way."""
    return t.detach()


def _run_fused(name: str, fn, *args: Tensor):  # type: ignore[no-untyped-def]
    """``fn`` compiled (once per process, dynamic shapes), or ``None`` after warning when compiling fails."""
    try:
        compiled = _FUSED.get(name)
        if compiled is None:
            compiled = _FUSED[name] = torch.compile(fn, dynamic=True)
        return compiled(*args)  # type: ignore[operator]
    except Exception as err:  # noqa: BLE001 - no compiler toolchain, unsupported platform...: fall back, loudly
        _FUSED["broken"] = True
        warnings.warn(
            f"SelfCompression(compile=...): torch.compile of the quantizer failed ({type(err).__name__}: {err}); "
            "using the eager quantizer",
            stacklevel=3,
        )
        return None


class _QuantizeSTE(torch.autograd.Function):
    """Forward ``s·round(clamp(w, lo·s, hi·s)/s)`` (= ``s·round(clamp(w/s, lo, hi))``: ``s`` is a power of two, so the
    scaling is exact): one weight-sized allocation and 4 passes. The backward allocates one weight-sized tensor (the
    weight gradient); its other temporaries live in reused workspaces on the CPU, and its per-channel reductions are
    in-place products summed per row; nothing reads a value back to the host.
    Every tensor follows ``weight``/``b``; ``b``/``e`` may be float32 while ``weight`` is half precision (``*-true``
    precision): the arithmetic runs in the promoted dtype and the result is cast back to ``weight``'s dtype (exact for
    the bit depths a half-precision mantissa holds)."""

    @staticmethod
    def forward(ctx, weight: Tensor, b: Tensor, e: Tensor, fused: bool = False) -> Tensor:  # type: ignore[override]
        ctx.fused = fused and _fusable(weight, b)
        ctx.cl = cl = channels_last(weight)  # the fused kernels read and write a channels_last weight in its layout
        if ctx.fused:
            bd, ed = b.detach(), e.detach()
            w_rows = _alone(rows(weight, cl))
            res = _run_fused(
                "forward", _forward_math, w_rows, bd.view(-1, 1), torch.exp2(ed).view(-1, 1), _half(bd).view(-1, 1)
            )
            if res is not None:
                out_rows, lo, hi, factor = res
                # the backward's kernel takes the rows as they are (no second view of the weight and the output)
                ctx.save_for_backward(w_rows, out_rows, lo, hi, factor)
                ctx.shape = weight.shape
                return unrows(out_rows, weight.shape, cl)
            ctx.fused = False
        shape = (-1,) + (1,) * (weight.dim() - 1)
        s = torch.exp2(e)
        lo, hi, factor = _ranges(b, s, _half(b))
        lo, hi = lo.view(shape), hi.view(shape)
        sv = s.view(shape)
        out = torch.clamp(weight, lo, hi).div_(sv).round_().mul_(sv)
        ctx.save_for_backward(weight, out, lo, hi, factor)
        return out if out.dtype == weight.dtype else out.to(weight.dtype)

    @staticmethod
    @once_differentiable  # the STE's gradient is not itself differentiated (and the workspaces must not be recorded)
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, out, lo, hi, factor = ctx.saved_tensors
        if ctx.fused:  # the fused forward saved the weight and its quantized values as rows (C, N)
            cl = ctx.cl
            if grad.dtype == torch.float32 and _fusable(weight, lo):
                res = _run_fused("backward", _backward_math, _alone(rows(grad, cl)), weight, out, lo, hi, factor)
                if res is not None:
                    grad_in, grad_b, grad_e = res
                    grad_w = unrows(grad_in, ctx.shape, cl) if ctx.needs_input_grad[0] else None
                    need_b, need_e = ctx.needs_input_grad[1:3]
                    return grad_w, grad_b if need_b else None, grad_e if need_e else None, None
            # a gradient of another dtype, or a failed compile: the eager backward, from the same saved tensors (the
            # fused forward saved the ranges as (C, 1) columns)
            weight, out = unrows(weight, ctx.shape, cl), unrows(out, ctx.shape, cl)
            shape = (-1,) + (1,) * (weight.dim() - 1)
            lo, hi, factor = lo.view(shape), hi.view(shape), factor.view(-1)
        w = weight if weight.dtype == out.dtype else weight.to(out.dtype)  # half weights: compute in b/e's dtype
        if grad.dtype != out.dtype:
            grad = grad.to(out.dtype)
        d = torch.clamp(w, lo, hi, out=_workspace(w, w.dtype)).sub_(w)  # < 0 above the range, > 0 below, 0 inside
        grad_in = torch.where(torch.eq(d, 0, out=_workspace(d, torch.bool)), grad, 0.0)
        grad_w = grad_in.to(weight.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad_e = None
        if ctx.needs_input_grad[1]:  # ln2·s·2^(b−1)·Σ g·(+1 above, −1 below), 0 for b ≤ 0
            grad_b = _rowsum(d.sign_().mul_(grad)).mul_(factor)
        if ctx.needs_input_grad[2]:  # ln2·Σ g·(q − w·[inside]), summed as −ln2·Σ (g_in·w − g·q)
            grad_e = _rowsum(torch.mul(grad_in, w, out=d).addcmul_(grad, out, value=-1.0)).mul_(-LN2)
        return grad_w, grad_b, grad_e, None


def quantize(weight: Tensor, b: Tensor, e: Tensor, fused: bool = False) -> Tensor:
    """Quantize ``weight`` (shape ``(C, ...)``) with per-output-channel bit depth ``b`` and exponent ``e`` (``(C,)``).

    ``fused=True`` runs large float32 CPU layers through torch.compile'd kernels (same values; the gradients' sums in
    another order); the first such call compiles (seconds).

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
    return _QuantizeSTE.apply(weight, b, e, fused)


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
