"""One implementation of self-compression shared by the ``SelfCompression`` callback and ``CompressionMixin``."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai._validation import validate_number
from lightning_xai.quantization.batched import BatchedQuantization
from lightning_xai.quantization.install import (
    QuantizedLayer,
    compile_pattern,
    install_quantizers,
    prepare_batchnorm_gates,
    quantized_layers,
    refuse_lazy,
)
from lightning_xai.quantization.size import SizeReport, float_state_bytes, size_report

__all__ = ["SelfCompressor", "PenaltyTerms"]

# compile="auto" fuses the CPU quantizer from this many quantized weights on (≈ 10–20 s of compilation saved back
# within about a thousand steps: ResNet-50, 25 M weights, saves ≈ 120 ms per step on 2 cores)
AUTO_COMPILE_MIN_WEIGHTS = 2_000_000


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
    the number of quantized weights at install time. ``L1 = Σ |w| / N0`` over the latent float weights. Each channel's
    term is weighted by its quantizer's ``relief`` (1 by default; ``PreservationGuard`` lowers it for channels it had
    to restore, so they are not driven back to the precision that hurt).

    Args:
        gamma: weight of the size penalty ``Q``.
        alpha: weight of the L1 penalty.
        init_bits: initial bit depth of every channel.
        include: regex of layer names to quantize (``re.search``); ``None`` selects every Conv/Linear layer. A layer
            whose weight another module holds too (tied weights) stays in float, with a warning.
        exclude: regex of layer names to leave in float.
        compile: on the CPU, run the large float32 layers' quantizer through ``torch.compile``'d kernels (one fused
            loop each way: about a quarter of the eager quantizer's time; the first step compiles, ≈ 10–20 s once per
            process). ``"auto"`` (default): only when the quantized layers hold at least 2 million weights, where the
            saving repays the compilation within about a thousand steps. GPUs use the batched quantizer instead.
    """

    def __init__(
        self,
        gamma: float = 0.02,
        alpha: float = 0.0,
        init_bits: float = 8.0,
        include: str | None = None,
        exclude: str | None = None,
        compile: bool | str = "auto",
    ) -> None:
        validate_number("gamma", gamma, low=0.0)
        validate_number("alpha", alpha, low=0.0)
        validate_number("init_bits", init_bits, low=1.0, high=32.0)
        compile_pattern(include, "include")
        compile_pattern(exclude, "exclude")
        self.gamma = float(gamma)
        self.gamma_scale = 1.0  # the callback's γ warm-up: the penalty uses γ·gamma_scale (a Python float, no sync)
        self.alpha = float(alpha)
        self.init_bits = float(init_bits)
        self.include = include
        self.exclude = exclude
        if not (isinstance(compile, bool) or compile == "auto"):
            raise ValueError(f"`compile` must be True, False or 'auto', got {compile!r}")
        self.compile = compile
        self.model: nn.Module | None = None
        self.initial_weights = 0
        self.float_bytes = 0
        self._layers: list[QuantizedLayer] | None = None
        self._weights: Tensor | None = None
        self._weights_key: tuple | None = None
        self._batched: BatchedQuantization | None = None

    # -- installation ---------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> list[QuantizedLayer]:
        """Install quantizers on ``model`` (idempotent) and record its float32 size for the ratios."""
        refuse_lazy(model)  # before anything is measured or changed
        fresh = not quantized_layers(model)
        if fresh:
            self.float_bytes = float_state_bytes(model)
        layers = install_quantizers(model, self.include, self.exclude, self.init_bits)
        prepare_batchnorm_gates(model)  # now, before a DDP wrapper exists; paired after the first forward
        if not layers:
            raise ValueError(
                f"no layer matched: `include`={self.include!r}, `exclude`={self.exclude!r} select none of the "
                "Conv1d/Conv2d/Linear/MultiheadAttention layers of the model (or only ones whose weight is tied to "
                "another module, which stay in float)"
            )
        if fresh:
            self.initial_weights = sum(layer.original.numel() for layer in layers)
        elif not self.initial_weights:  # compressed by an earlier run: count what the model had before it
            self.initial_weights, self.float_bytes = _uncompressed_counts(model, layers)
        fuse = self.compile
        if fuse == "auto":
            fuse = sum(layer.original.numel() for layer in layers) >= AUTO_COMPILE_MIN_WEIGHTS
        for layer in layers:
            layer.quantizer.compiled = fuse
        self.model = model
        self._layers = layers
        self._weights_key = None
        if self._batched is not None:
            self._batched.detach()
        me = weakref.ref(self)  # no reference cycle: the batching lives exactly as long as this compressor
        self._batched = BatchedQuantization(lambda: me().layers if me() is not None else [])
        self._batched.attach(model)  # every forward of `model` quantizes all layers in one call
        return layers

    def detach(self) -> None:
        """Remove the forward hooks :meth:`install` put on the model (the quantizers stay)."""
        if self._batched is not None:
            self._batched.detach()
            self._batched = None

    @property
    def layers(self) -> list[QuantizedLayer]:
        """The quantized layers (cached: physical removal keeps the modules and their parametrizations; call
        :meth:`refresh` after installing or removing quantizers by hand)."""
        if self.model is None:
            raise RuntimeError("SelfCompressor.install(model) has not been called")
        if self._layers is None:
            self._layers = quantized_layers(self.model)
        return self._layers

    def refresh(self) -> None:
        """Forget the cached layer list (after quantizers were installed or removed outside :meth:`install`)."""
        self._layers = None
        self._weights_key = None

    def quant_parameters(self) -> list[nn.Parameter]:
        """Every ``b`` and ``e`` (in layer order)."""
        params: list[nn.Parameter] = []
        for layer in self.layers:
            params += [layer.quantizer.b, layer.quantizer.e]
        return params

    def _channel_weights(self, pairs: list[tuple[Any, Tensor]]) -> Tensor:
        """``n_l / N0`` for every channel of the layers whose (quantizer, latent weight) are ``pairs`` (looked up
        once per step by the caller: each lookup walks the parametrization's module containers), concatenated like
        their ``b`` (one device tensor, rebuilt only when a layer's shape, relief or device changed)."""
        # a per-step check in pure Python on cached attributes (shapes, ids, versions): no tensor is created
        key = tuple((q.b.shape[0], w.shape[1:], id(q.relief), q.relief._version) for q, w in pairs)
        if pairs:
            key += ((pairs[0][0].b.device, pairs[0][0].b.dtype),)
        if key != self._weights_key or self._weights is None:
            n0 = float(max(self.initial_weights, 1))
            device, dtype = pairs[0][0].b.device, pairs[0][0].b.dtype
            self._weights = torch.cat(
                [q.relief.to(device=device, dtype=dtype) * (_per_channel(w) / n0) for q, w in pairs]
                or [torch.zeros(0, device=device, dtype=dtype)]
            )
            self._weights_key = key
        return self._weights

    # -- objective ------------------------------------------------------------------------------------------
    def penalty(self) -> PenaltyTerms:
        """``gamma_scale·(γ·Q + α·L1)`` as differentiable tensors (one concatenation over all layers, not a loop of
        small ops); ``gamma_scale`` is the callback's warm-up ramp (1 without one)."""
        layers = self.layers
        pairs = [(layer.quantizer, layer.original) for layer in layers]
        bits = [quantizer.b for quantizer, _ in pairs]
        q = (torch.cat(bits).clamp(min=0) * self._channel_weights(pairs)).sum()
        if self.alpha:
            n0 = max(self.initial_weights, 1)
            l1 = torch.stack([layer.original.abs().sum() for layer in layers]).sum() / n0
        else:
            l1 = torch.zeros((), device=q.device, dtype=q.dtype)
        return PenaltyTerms(q=q, l1=l1, total=self.gamma_scale * (self.gamma * q + self.alpha * l1))

    def add_penalty_gradients(self, scale: float = 1.0, bits: bool = True) -> None:
        """Add ``scale · gamma_scale · ∇(γ·Q + α·L1)`` to the ``.grad`` of ``b`` (and of the weights if ``alpha > 0``).

        Used by the callback, which cannot change the user's loss. The penalty depends on parameters only, so its
        gradient is exact without a second backward through the network (and DDP hooks are not triggered). It is
        the closed form of :meth:`penalty`'s gradient: ``∂Q/∂b_lc = n_l/N0 · [b_lc > 0]``,
        ``∂L1/∂w = sign(w)/N0``; a test checks it against autograd. ``bits=False`` adds only the L1 part (after the
        bit depths are frozen, the weights still feel α). A handful of ops for the whole model (one
        concatenation, one split, foreach updates), none of which reads a value back to the host.
        """
        gamma = self.gamma * self.gamma_scale
        with torch.no_grad():
            if gamma and bits:
                pairs = [(layer.quantizer, layer.original) for layer in self.layers]
                pairs = [(q, w) for q, w in pairs if q.b.requires_grad]
                bits = [q.b for q, _ in pairs]
                if bits:
                    flat = torch.cat(bits)
                    grads = ((flat > 0) * self._channel_weights(pairs)) * (scale * gamma)
                    _add_grads(bits, list(grads.split([b.shape[0] for b in bits])))
            alpha = self.alpha * self.gamma_scale
            if alpha:
                weights = [layer.original for layer in self.layers if layer.original.requires_grad]
                if weights:
                    signs = torch._foreach_sign(weights)
                    torch._foreach_mul_(signs, scale * alpha / max(self.initial_weights, 1))
                    _add_grads(weights, signs)

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


def _uncompressed_counts(model: nn.Module, layers: list[QuantizedLayer]) -> tuple[int, int]:
    """(quantized weights, float32 bytes of the plain state) of ``model`` before any channel was removed, for a model
    that an earlier run compressed (a new callback's ``N0`` must be that run's: with ``N0 = 0`` every channel's share
    of ``Q`` would be its whole weight count, and the size penalty thousands of times too strong)."""
    from lightning_xai.pruning.surgery import original_shapes  # surgery imports the quantization package

    shapes = original_shapes(model)
    weights = sum(math.prod(shapes.get(layer.qualified, layer.original.shape)) for layer in layers)
    return weights, float_state_bytes(model, shapes)


def _per_channel(weight: Tensor) -> int:
    """Weights per output channel of ``weight`` (shape ``(C, ...)``)."""
    return math.prod(weight.shape[1:])


def _add_grads(params: list[Tensor], grads: list[Tensor]) -> None:
    """``p.grad += g`` for every pair, as one foreach op over the parameters that already have a gradient."""
    have = [(p, g) for p, g in zip(params, grads) if p.grad is not None]
    if have:
        torch._foreach_add_([p.grad for p, _ in have], [g for _, g in have])  # type: ignore[misc]
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
