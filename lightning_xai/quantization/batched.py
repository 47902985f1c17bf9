"""All of a model's quantizers as one autograd node: a handful of kernels per step instead of ~25 per layer (GPU).

The per-layer quantizer (:mod:`lightning_xai.quantization.ste`) launches about 10 small kernels in the forward and
15 in the backward of every layer: on a GPU with torchvision ResNet-50 (54 layers) that is ~1,350 launches and their
Python dispatch per step, which the step time feels far more than the arithmetic (a few weight-sized passes). Here
the same maths runs once over the concatenation of every layer's weight (on accelerators; CPU models keep the
per-layer path, see ``BATCH_ON_CPU``):

* a forward pre-hook on the model (``BatchedQuantization.attach``) concatenates the latent weights, ``b`` and ``e``
  of all quantized layers (grouped by device and dtype), quantizes them in one :class:`_BatchedQuantizeSTE` call and
  leaves each layer's slice with its quantizer;
* the layer's parametrization (``ChannelQuantizer.forward``) returns that slice when it was computed from the very
  tensors it is given (same objects, unchanged ``_version``); anything else (a layer called outside the model's
  forward, a changed weight) takes the per-layer path, which computes the same numbers;
* the backward concatenates the incoming gradients, and reduces per channel with one ``segment_reduce``.

Results are bit-for-bit those of the per-layer quantizer in the forward; the ``b``/``e`` gradients are the same sums
in a different order (float rounding). Activation checkpointing recomputes layers inside the backward: the slices
are then still served (same tensors, same versions), so the recomputation replays the forward's graph exactly.

Costs: a copy of the weights (the concatenation, each layer's slice 16-element aligned by zero padding, saved for
the backward), the quantized weights as one tensor (the per-layer path allocates them too), an ``int32`` channel
index per weight (built once per set of shapes), and a ``(N, 3)`` gather of the per-channel ranges during forward
and backward. Under DDP every weight gradient becomes
ready when the first layer's backward has run, so gradient all-reduce overlaps less with the backward.
Written by hand: no library quantizes many tensors with per-row learnable ranges in one fused call.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.quantization.install import gates_version, paired_gates
from lightning_xai.quantization.quantizer import SERVED, Serving
from lightning_xai.quantization.ste import LN2, channels_last, rows, unrows

__all__ = ["BatchedQuantization", "batched_quantize", "per_layer_quantization"]

_PAUSED = 0
# Batch the layers of CPU models too? Off: on a CPU the step pays for memory passes and fresh allocations, not for
# launches, and the concatenations, the (N, 3) range gather and the segment reduction cost more than they save
# (ResNet-50, 2 cores: 1.18 s for the batched quantizer's forward + backward vs 0.19 s layer by layer). Tests turn
# it on to run the batched maths on the CPU.
BATCH_ON_CPU = False


@contextlib.contextmanager
def per_layer_quantization() -> Iterator[None]:
    """Forwards inside quantize layer by layer: for code that reads the autograd graph to find which layer feeds
    which (torch-pruning's dependency tracing), where one node joining every layer's weight would couple them all."""
    global _PAUSED
    _PAUSED += 1
    try:
        yield
    finally:
        _PAUSED -= 1


# Every layer's slice of the concatenations starts ALIGN elements apart (zero padding between layers): the slices
# are handed to kernels as weights, gradients and batch-norm affine parameters, and some CUDA kernels load those with
# vector instructions that need 16-byte aligned addresses. Unpadded, a slice began wherever the previous layer
# ended (4-byte aligned): on an H200, channels_last batch norm under 16-mixed then died with "CUDA error: misaligned
# address". 16 elements are 32 bytes for 2-byte dtypes and 64 for float32.
ALIGN = 16


def _padding(n: int) -> int:
    return -n % ALIGN


class _Padded:
    """The layout of 1-D parts of lengths ``numels`` in one flat tensor, each part starting ALIGN elements after the
    previous one (zeros between): built once per set of lengths, with its zero pads per dtype, so that a
    concatenation costs one ``cat`` and a split one ``split`` (no per-part slicing)."""

    def __init__(self, numels: list[int], device: torch.device) -> None:
        self.numels = list(numels)
        self.device = device
        self.sizes = [k for n in self.numels for k in (n, _padding(n))]
        self._pads: dict[torch.dtype, list[Tensor]] = {}

    def cat(self, parts: list[Tensor] | tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        """The ``parts`` (of one dtype) concatenated with their padding, then in ``dtype``."""
        pads = self._pads.get(parts[0].dtype)
        if pads is None:
            pads = self._pads[parts[0].dtype] = [
                torch.zeros(_padding(n), dtype=parts[0].dtype, device=self.device) for n in self.numels
            ]
        flat = torch.cat([t for part, pad in zip(parts, pads) for t in (part, pad)])
        return flat if flat.dtype == dtype else flat.to(dtype)

    def split(self, flat: Tensor) -> list[Tensor]:
        """The parts back from a tensor laid out like :meth:`cat`'s, as views of it."""
        return list(flat.split(self.sizes)[::2])

    def aligned(self, packed: Tensor) -> list[Tensor]:
        """The parts of ``packed`` (1-D, the parts back to back without padding), each starting at an aligned
        address."""
        return self.split(self.cat(packed.split(self.numels), packed.dtype))


class _Meta:
    """Shapes of one group of layers and the device-side indices that map each weight to its channel (the padding
    after a layer counts as part of its last channel: zeros there add nothing to its sums)."""

    def __init__(self, shapes: list[torch.Size], device: torch.device) -> None:
        self.shapes = shapes
        self.channels = [int(s[0]) for s in shapes]
        self.numels = [int(torch.Size(s).numel()) for s in shapes]
        per_channel = [n // c if c else 0 for n, c in zip(self.numels, self.channels)]
        total = sum(n + _padding(n) for n in self.numels)
        # built once per set of shapes (a removal changes them): host lists → one copy to the device
        host: list[int] = []
        for k, c, n in zip(per_channel, self.channels, self.numels):
            host += [k] * c
            if c:
                host[-1] += _padding(n)
        lengths = torch.tensor(host, dtype=torch.int64, device="cpu")
        self.lengths = lengths.to(device)
        self.segment = torch.repeat_interleave(
            torch.arange(lengths.numel(), dtype=torch.int32, device=device), self.lengths, output_size=total
        )
        self.weights = _Padded(self.numels, device)
        self.per_channel = _Padded(self.channels, device)  # the b/e gradients


class _BatchedQuantizeSTE(torch.autograd.Function):
    """``q(w, b, e)`` of :mod:`ste` for ``L`` layers at once: inputs ``(meta, serving, w_1..w_L, b_1..b_L,
    e_1..e_L)``, outputs the ``L`` quantized weights."""

    @staticmethod
    def forward(ctx: Any, meta: _Meta, serving: Serving, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        n = len(meta.shapes)
        weights, bits, exps = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        b, e = torch.cat(bits), torch.cat(exps)
        dtype = torch.promote_types(weights[0].dtype, b.dtype)
        # channels_last weights are read, and their quantized weights written, in that layout (each channel's values
        # stay one segment): a convolution given both in one layout converts neither
        layouts = ctx.layouts = tuple(channels_last(t) for t in weights)
        w = meta.weights.cat([(rows(t, cl) if cl else t).reshape(-1) for t, cl in zip(weights, layouts)], dtype)
        alive = b > 0
        s = torch.exp2(e)
        hs = torch.exp2(b.clamp(min=0.0) - 1.0) * s  # the range in weight units: [-half·s, (half-1)·s]
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        ranges = torch.stack((torch.where(alive, -hs, zero), torch.where(alive, hs - s, zero), s), dim=1)
        lo, hi, sv = ranges.index_select(0, meta.segment).unbind(1)
        out = torch.clamp(w, lo, hi).div_(sv).round_().mul_(sv)
        ctx.meta = meta
        ctx.serving = serving
        ctx.weight_dtype = weights[0].dtype
        ctx.save_for_backward(w, out, ranges, hs, alive)
        if out.dtype != weights[0].dtype:
            out = out.to(weights[0].dtype)
        return tuple(unrows(o, shape, cl) for o, shape, cl in zip(meta.weights.split(out), meta.shapes, layouts))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        meta: _Meta = ctx.meta
        n = len(meta.shapes)
        w, out, ranges, hs, alive = ctx.saved_tensors
        ctx.serving.done = True  # the graph of these outputs is spent: they are not served again
        g = meta.weights.cat([(rows(t, cl) if cl else t).reshape(-1) for t, cl in zip(grads, ctx.layouts)], out.dtype)
        lo, hi, _ = ranges.index_select(0, meta.segment).unbind(1)
        d = torch.clamp(w, lo, hi).sub_(w)  # < 0 above the range, > 0 below, 0 inside
        grad_in = torch.where(d == 0, g, torch.zeros((), dtype=g.dtype, device=g.device))
        need_w = any(ctx.needs_input_grad[2 : 2 + n])
        need_b = any(ctx.needs_input_grad[2 + n : 2 + 2 * n])
        need_e = any(ctx.needs_input_grad[2 + 2 * n :])
        grad_w: list[Tensor | None] = [None] * n
        if need_w:
            gw = grad_in if grad_in.dtype == ctx.weight_dtype else grad_in.to(ctx.weight_dtype)
            grad_w = [unrows(t, shape, cl) for t, shape, cl in zip(meta.weights.split(gw), meta.shapes, ctx.layouts)]
        grad_b: list[Tensor | None] = [None] * n
        grad_e: list[Tensor | None] = [None] * n
        if need_b or need_e:
            # per channel: Σ g·(q − w·[inside]) for e and Σ g·sign(clamp(w) − w) for b, in one segment reduction
            terms = torch.stack((g * out - grad_in * w, g * d.sign_()), dim=1)
            sums = torch.segment_reduce(terms, "sum", lengths=meta.lengths, axis=0, unsafe=True)
            if need_e:
                grad_e = meta.per_channel.aligned(sums[:, 0] * LN2)
            if need_b:
                grad_b = meta.per_channel.aligned(sums[:, 1] * (hs * alive) * -LN2)
        return (None, None, *grad_w, *grad_b, *grad_e)


class _GateMul(torch.autograd.Function):
    """``t_i · mask_i`` for the 1-D tensors ``t_1..t_L`` and their masks, laid out by ``padded`` (``mask``): one
    multiply forward and backward, aligned slices out and in. (As one Function: slicing the padded product outside
    one would add a slice-backward per gate, two kernels each.)"""

    @staticmethod
    def forward(ctx: Any, padded: _Padded, mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.save_for_backward(mask)
        ctx.padded = padded
        return tuple(padded.split(padded.cat(tensors, mask.dtype) * mask))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return (None, None, *ctx.padded.split(ctx.padded.cat(grads, mask.dtype) * mask))


def batched_quantize(weights: list[Tensor], bits: list[Tensor], exps: list[Tensor]) -> tuple[Tensor, ...]:
    """Quantize every ``weights[i]`` with its ``bits[i]``/``exps[i]`` in one autograd node (same values as
    :func:`lightning_xai.quantization.ste.quantize` on each). All tensors on one device; weights of one dtype.

    Example:
        >>> w = [torch.tensor([[0.30, -0.70], [0.05, 0.02]]), torch.tensor([[1.3]])]
        >>> q = batched_quantize(w, [torch.tensor([3.0, 0.0]), torch.tensor([2.0])], [torch.tensor([-2.0, -2.0]),
        ...                      torch.tensor([0.0])])
        >>> [t.tolist() for t in q]
        [[[0.25, -0.75], [0.0, 0.0]], [[1.0]]]
    """
    meta = _Meta([t.shape for t in weights], weights[0].device)
    return _BatchedQuantizeSTE.apply(meta, Serving(), *weights, *bits, *exps)


class BatchedQuantization:
    """Quantizes every layer of ``layers()`` in one call at the start of each forward of the model it is attached
    to, and hands each quantizer its slice (see the module docstring)."""

    def __init__(self, layers: Any) -> None:
        self._layers = layers  # a callable returning the QuantizedLayer list (the compressor's, kept fresh)
        self._metas: dict[tuple, _Meta] = {}
        self._gate_layouts: dict[tuple, _Padded] = {}
        self._paired: tuple[int, list, list] | None = None
        self._handles: list[Any] = []
        self._box = [Serving()]

    def attach(self, model: nn.Module) -> None:
        """Quantize at the start of every forward of ``model`` (its slices are served until that forward ends, and
        during a backward that recomputes it)."""
        self.detach()
        ref = weakref.ref(self)
        target = weakref.ref(model)
        box = self._box  # the running forward's Serving, reachable by the hooks even if this object is collected

        # a deep copy of the model copies these hooks too: they act only on the model they were attached to
        def pre_hook(module: nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling():  # a user's compiled step: its graph quantizes (and fuses) each layer
                return
            owner = ref()
            if owner is not None and target() is module:
                owner.quantize_all()

        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.compiler.is_compiling() and target() is module:
                box[0].active = False

        self._handles = [
            model.register_forward_pre_hook(pre_hook),
            model.register_forward_hook(post_hook, always_call=True),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._paired = None
        for _, q, _ in self._live():
            SERVED.pop(q, None)

    def _live(self) -> list[tuple[Any, Any, Tensor]]:
        """(layer, quantizer, latent weight) of every layer that still carries its quantizer."""
        try:
            layers = list(self._layers())
        except RuntimeError:  # not installed (any more)
            return []
        live = []
        for layer in layers:
            try:
                live.append((layer, layer.quantizer, layer.original))
            except (AttributeError, KeyError, IndexError):  # quantizers removed by hand since
                continue
        return live

    def quantize_all(self) -> None:
        """Quantize every layer now (one autograd node per device/dtype group) and serve the slices."""
        self._box[0].active = False  # slices of an earlier forward are no longer served
        if _PAUSED:
            return
        live = self._live()
        groups: dict[tuple, list] = {}
        for _, q, w in live:
            if _batched_here(w, q):
                groups.setdefault((w.device, w.dtype, q.b.dtype), []).append((q, w))
        serving = self._box[0] = Serving()
        for key, members in groups.items():
            shapes = tuple(tuple(w.shape) for _, w in members)
            meta = self._metas.get((key, shapes))
            if meta is None:
                if len(self._metas) > 8:  # shapes change only at removals: keep a few, drop the rest
                    self._metas.clear()
                meta = self._metas[(key, shapes)] = _Meta([w.shape for _, w in members], key[0])
            weights = [w for _, w in members]
            bits, exps = [q.b for q, _ in members], [q.e for q, _ in members]
            outs = _BatchedQuantizeSTE.apply(meta, serving, *weights, *bits, *exps)
            for (q, w), out in zip(members, outs):
                SERVED[q] = (out, w, w._version, q.b._version, q.e._version, serving)
        if groups:  # no batched weights (a CPU model): its gates are not batched either, skip looking for them
            self._gate_all(live, serving)

    def _paired_gates(self, live: list[tuple[Any, Any, Tensor]]) -> list:
        """:func:`paired_gates` of the live layers, looked up again only when a layer, a quantizer, a weight tensor
        (a removal replaces it) or the set of gated batch norms changed: a walk over every gate costs ≈ 1–2 ms of
        Python per forward on a ResNet-50, host time that a GPU step waits for."""
        objects = [x for _, q, w in live for x in (q, w)]
        cached = self._paired
        if (
            cached is None
            or cached[0] != gates_version()
            or len(cached[1]) != len(objects)
            or not all(a is b for a, b in zip(cached[1], objects))  # identities (`==` on tensors compares values)
        ):
            cached = self._paired = (gates_version(), objects, paired_gates([layer for layer, _, _ in live]))
        return cached[2]

    def _gate_all(self, live: list[tuple[Any, Any, Tensor]], serving: Serving) -> None:
        """The bias and batch-norm gates (``tensor · [b > 0]``) of every paired layer in one multiply per
        device/dtype: a ResNet-50 has ~160 of them, each a few kernels forward and backward."""
        groups: dict[tuple, list] = {}
        for gate, tensor, q in self._paired_gates(live):
            if _batched_here(tensor, q) and q.b.shape[0] == tensor.shape[0]:
                groups.setdefault((tensor.device, tensor.dtype), []).append((gate, tensor, q))
        for (device, dtype), members in groups.items():
            sizes = tuple(t.shape[0] for _, t, _ in members)
            padded = self._gate_layouts.get((device, sizes))
            if padded is None:
                if len(self._gate_layouts) > 8:  # as the metas
                    self._gate_layouts.clear()
                padded = self._gate_layouts[(device, sizes)] = _Padded(list(sizes), device)
            with torch.no_grad():
                mask = padded.cat([q.b for _, _, q in members], members[0][2].b.dtype) > 0
            parts = _GateMul.apply(padded, mask.to(dtype), *[t for _, t, _ in members])
            for (gate, t, q), part in zip(members, parts):
                SERVED[gate] = (part, t, t._version, q.b._version, q.e._version, serving)


def _batched_here(tensor: Tensor, quantizer: Any) -> bool:
    """Accelerator tensors are batched; CPU ones only with ``BATCH_ON_CPU``, and never those of ``compile=True``
    layers (compiling is the CPU's fusion)."""
    return tensor.device.type != "cpu" or (BATCH_ON_CPU and not quantizer.compiled)
