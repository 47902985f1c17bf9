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

__all__ = ["ChannelQuantizer", "BiasGate", "BatchNormGate", "initial_exponent", "SERVED", "Serving"]


class Serving:
    """Whether the model forward that computed a batch of quantized weights is still running (``active``), and
    whether the backward of that batch has run (``done``: its saved tensors are freed, its outputs are stale)."""

    __slots__ = ("active", "done")

    def __init__(self) -> None:
        self.active = True
        self.done = False


# quantizer → (quantized weight, the latent weight it came from, its version, b's version, e's version, Serving):
# slices computed by :class:`lightning_xai.quantization.batched.BatchedQuantization` for the running forward. Kept
# outside the modules so that deep copies, pickles and state dicts never see them.
SERVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fresh(served: tuple, source: Tensor, quantizer: ChannelQuantizer) -> bool:
    """Whether a served result was computed from exactly ``source`` and ``quantizer`` as they are now, for the
    forward that is running (or for the backward of that forward, which recomputes parts of it under activation
    checkpointing)."""
    serving = served[5]
    return (
        served[1] is source
        and served[2] == source._version
        and served[3] == quantizer.b._version
        and served[4] == quantizer.e._version
        and (serving.active or (not serving.done and torch._C._current_graph_task_id() >= 0))
    )


def initial_exponent(weight: Tensor, bits: float) -> Tensor:
    """Per-channel exponent so that ``bits``-bit codes cover the channel's largest magnitude.

    ``e = ceil(log2(max|w| / (2^(bits-1) - 1)))``; an all-zero channel gets the exponent of the layer's largest.
    """
    with torch.no_grad():
        amax = weight.detach().abs().flatten(1).amax(dim=1)
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
        dtype = torch.promote_types(weight.dtype, torch.float32)  # b/e stay float32 under half precision
        self.b = nn.Parameter(torch.full((channels,), float(init_bits), dtype=dtype, device=weight.device))
        self.e = nn.Parameter(initial_exponent(weight.to(dtype), init_bits))
        # per-channel weight of the size penalty (1: full pressure; a guard sets restored channels lower)
        self.register_buffer("relief", torch.ones(channels, dtype=dtype, device=weight.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = f"{prefix}relief"
        if key not in state_dict and f"{prefix}b" in state_dict:  # checkpoints from before the relief existed
            state_dict[key] = torch.ones_like(state_dict[f"{prefix}b"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    compiled: bool = False  # set by SelfCompression(compile=...): fused torch.compile'd kernels on the CPU

    def forward(self, weight: Tensor) -> Tensor:
        # inside a torch.compile'd forward (a user's compiled model) the graph computes the weight itself: the lookup
        # would break the graph (a weak-keyed dict) and the compiler fuses the per-layer maths anyway
        served = None if torch.compiler.is_compiling() else SERVED.get(self)
        if served is not None and fresh(served, weight, self):
            return served[0]
        return quantize(weight, self.b, self.e, fused=self.compiled)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Device moves apply to ``b``/``e``; dtype casts to a lower precision do not: under
        ``precision="16-true"/"bf16-true"`` (``module.half()``), 7.3 bits must not become 7.3125, and Adam steps of
        0.5·lr must not vanish. (Lightning converts the whole module; this keeps its quantizer parameters float32.)"""

        def keep_precision(t: Tensor) -> Tensor:
            out = fn(t)
            if (
                isinstance(out, Tensor)
                and t.is_floating_point()
                and out.is_floating_point()
                and torch.finfo(out.dtype).bits < torch.finfo(t.dtype).bits
            ):
                return t.to(device=out.device)
            return out

        return super()._apply(keep_precision, recurse)

    def alive(self) -> Tensor:
        """Boolean mask of channels with a positive bit depth (the others output exactly zero)."""
        return self.b.detach() > 0

    def extra_repr(self) -> str:
        return f"channels={self.b.numel()}"


class BiasGate(nn.Module):
    """Multiplies the bias by the alive mask of the weight's quantizer, so a 0-bit channel outputs exactly zero.

    The quantizer is held through a weak reference (not a submodule), so ``b``/``e`` are not registered twice and
    deep copies keep the pairing. A gate without a quantizer (``None``) passes its tensor through unchanged.
    """

    def __init__(self, quantizer: ChannelQuantizer | None) -> None:
        super().__init__()
        self.set_quantizer(quantizer)

    def set_quantizer(self, quantizer: ChannelQuantizer | None) -> None:
        """Pair the gate with ``quantizer`` (or unpair it with ``None``); no tensor of the model changes."""
        self._quantizer_ref = None if quantizer is None else weakref.ref(quantizer)

    @property
    def quantizer(self) -> ChannelQuantizer | None:
        if self._quantizer_ref is None:
            return None
        q = self._quantizer_ref()
        if q is None:  # pragma: no cover - only if the weight parametrization was dropped by hand
            raise RuntimeError(f"{type(self).__name__} lost its ChannelQuantizer; reinstall the quantizers")
        return q

    def forward(self, tensor: Tensor) -> Tensor:
        q = self.quantizer
        if q is None or q.b.shape[0] != tensor.shape[0]:
            return tensor
        served = None if torch.compiler.is_compiling() else SERVED.get(self)
        if served is not None and fresh(served, tensor, q):
            return served[0]
        return tensor * (q.b > 0)  # a bool factor: no gradient into b, dtype of ``tensor``

    def __deepcopy__(self, memo: dict) -> BiasGate:
        import copy

        quantizer = self.quantizer
        new = type(self)(None if quantizer is None else copy.deepcopy(quantizer, memo))
        new.train(self.training)
        return new

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_quantizer_ref"] = self.quantizer  # strong reference while pickling
        return state

    def __setstate__(self, state: dict) -> None:
        q = state.pop("_quantizer_ref")
        self.__dict__.update(state)
        self.set_quantizer(q)


class BatchNormGate(BiasGate):
    """Multiplies a batch norm's ``weight`` (γ) or ``bias`` (β) by the alive mask of the quantizer whose layer feeds
    it, so a 0-bit channel stays exactly zero after the normalisation: with γ = β = 0 the output is 0 in eval mode
    and in train mode (the channel's input is all zeros, so its batch mean and variance are 0 too). Folding the gate
    into γ/β costs a channel-sized multiply instead of an activation-sized one.

    ``SelfCompression`` registers these gates unpaired (pass-through) on every affine batch norm in ``setup``, before
    DDP wraps the model (registering a parametrization later re-seats the parameter, which DDP's gradient hooks do
    not survive), and pairs them with their producer's quantizer once the first training forward shows who feeds
    whom.
    """
