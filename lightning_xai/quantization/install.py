"""Install and find quantizers on a model's Conv1d/Conv2d/Linear layers (and attention input projections)."""

from __future__ import annotations

import copy
import re
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lightning_xai.quantization.quantizer import BatchNormGate, BiasGate, ChannelQuantizer

__all__ = [
    "QuantizedLayer",
    "QUANTIZABLE_TYPES",
    "install_quantizers",
    "quantized_layers",
    "remove_quantizers",
    "compile_pattern",
    "gate_batchnorm",
    "batchnorm_gates",
    "paired_gates",
    "clear_batchnorm_gates",
    "BatchNormFollowerRecorder",
    "apply_batchnorm_gates",
    "gate_following_batchnorms",
    "prepare_batchnorm_gates",
    "is_batchnorm",
    "tied_parameters",
    "fixed_weights",
    "foreign_parametrizations",
    "copy_model",
    "detach_hook_weights",
    "BN_TYPES",
]

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized tensor: ``module.<tensor>`` is ``q(original, b, e)``; ``bias`` is the gated bias name or None."""

    name: str
    module: nn.Module
    tensor: str
    bias: str | None

    @property
    def quantizer(self) -> ChannelQuantizer:
        return self.module.parametrizations[self.tensor][0]  # type: ignore[index,return-value]

    @property
    def original(self) -> nn.Parameter:
        return self.module.parametrizations[self.tensor].original  # type: ignore[index,return-value]

    @property
    def bias_original(self) -> nn.Parameter | None:
        if self.bias is None:
            return None
        return self.module.parametrizations[self.bias].original  # type: ignore[index,return-value]

    @property
    def qualified(self) -> str:
        """Name of the quantized tensor as it appears in a plain (unparametrized) state dict."""
        return f"{self.name}.{self.tensor}" if self.name else self.tensor


def compile_pattern(value: str | None, argument: str) -> re.Pattern[str] | None:
    """Compile a layer-name regex, raising a clear error that names ``argument``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"`{argument}` must be a regular expression string or None, got {type(value).__name__} {value!r}"
        )
    try:
        return re.compile(value)
    except re.error as err:
        raise ValueError(f"`{argument}`={value!r} is not a valid regular expression: {err}") from None


def _targets(module: nn.Module) -> list[tuple[str, str | None]]:
    """(weight tensor, bias tensor) pairs of ``module`` that take a per-output-row quantizer."""
    if isinstance(module, QUANTIZABLE_TYPES):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.transposed:  # pragma: no cover - ConvTranspose
            return []
        return [("weight", "bias" if module.bias is not None else None)]
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return [("in_proj_weight", "in_proj_bias" if module.in_proj_bias is not None else None)]
    return []


def _is_installed(module: nn.Module, tensor: str) -> bool:
    return parametrize.is_parametrized(module, tensor) and any(
        isinstance(p, ChannelQuantizer)
        for p in module.parametrizations[tensor]  # type: ignore[index]
    )


def install_quantizers(
    model: nn.Module,
    include: str | None = None,
    exclude: str | None = None,
    init_bits: float = 8.0,
) -> list[QuantizedLayer]:
    """Put a :class:`ChannelQuantizer` on every selected Conv1d/Conv2d/Linear weight (and MHA ``in_proj_weight``).

    A layer is selected when its qualified name matches ``include`` (``re.search``; default: every layer) and does
    not match ``exclude``. Layers that already carry a quantizer are left as they are, so the call is idempotent.
    Biases are gated so that a channel at 0 bits outputs exactly zero.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [q.name for q in install_quantizers(net, exclude=r"^2$")]
        ['0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(init_bits, bool) or not isinstance(init_bits, (int, float)) or not 1 <= init_bits <= 32:
        raise ValueError(f"`init_bits` must be a number in [1, 32], got {init_bits!r}")
    inc = compile_pattern(include, "include")
    exc = compile_pattern(exclude, "exclude")
    refuse_lazy(model)
    ties = tied_parameters(model)
    skipped: list[str] = []
    for name, module in list(model.named_modules()):
        if inc is not None and not inc.search(name):
            continue
        if exc is not None and exc.search(name):
            continue
        for tensor, bias in _targets(module):
            if _is_installed(module, tensor):
                continue
            reason = _not_quantizable(module, tensor, ties.get(_qualified(name, tensor)))
            if reason:
                skipped.append(f"{_qualified(name, tensor)} ({reason})")
                continue
            weight = getattr(module, tensor)
            quantizer = ChannelQuantizer(weight, float(init_bits))
            parametrize.register_parametrization(module, tensor, quantizer)
            if bias is not None:
                parametrize.register_parametrization(module, bias, BiasGate(quantizer))
    if skipped:
        warnings.warn(
            f"left in float, not quantized: {'; '.join(skipped)}; exclude the layer (`exclude=`) to silence this",
            UserWarning,
            stacklevel=2,
        )
    return quantized_layers(model)


def refuse_lazy(model: nn.Module) -> None:
    """Raise a clear error, before anything changes, when ``model`` holds lazy layers (``nn.LazyLinear`` & co.) whose
    parameters do not exist yet: neither their shapes nor their bits can be known."""
    lazy = [
        f"{name or type(model).__name__} ({type(module).__name__})"
        for name, module in model.named_modules()
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False))
    ]
    if lazy:
        raise ValueError(
            f"the model has lazy layers whose parameters are not initialized yet: {', '.join(lazy)}; run one forward "
            "with a batch first (with Lightning: `model(example_batch)` before `trainer.fit`)"
        )


def _not_quantizable(module: nn.Module, tensor: str, tied_to: list[str] | None) -> str | None:
    """Why ``module.<tensor>`` cannot take a quantizer, or ``None`` when it can."""
    if tied_to:
        # Tied weights (a language model's output layer sharing the embedding's matrix, …): the other holder would
        # keep reading the latent float tensor while this layer reads its quantized version, a pair the packed file
        # (one tensor per tie) cannot hold: the reloaded model would differ.
        return (
            f"tied to {', '.join(tied_to)}; a weight shared with another module cannot be quantized for one of them "
            "only"
        )
    foreign = foreign_parametrizations(module).get(tensor)
    if foreign:
        # weight_norm, spectral_norm, orthogonal, …: the latent tensors are the parametrization's (``original0``,
        # ``original1``, …), which the penalty, the channel removal and the packed export do not know how to slice
        return f"already parametrized by {', '.join(foreign)}; remove that parametrization to quantize the layer"
    if not isinstance(module._parameters.get(tensor), nn.Parameter):  # a buffer, or set by code of its own
        return "not a parameter of the layer"
    return None


def _qualified(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


def foreign_parametrizations(module: nn.Module) -> dict[str, list[str]]:
    """``{tensor: [parametrization class names]}`` for the tensors of ``module`` parametrized by something other than
    this library's quantizer and gates (``weight_norm``, ``spectral_norm``, ``orthogonal``, …)."""
    found: dict[str, list[str]] = {}
    # the deprecated hook versions (torch.nn.utils.weight_norm / spectral_norm) recompute the tensor from their own
    # parameters (weight_g and weight_v, …) before every forward
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            found.setdefault(hook.name, []).append(f"{type(hook).__name__} hook")
    if not parametrize.is_parametrized(module):
        return found
    ours = (ChannelQuantizer, BiasGate)  # BatchNormGate is a BiasGate
    for tensor, plist in module.parametrizations.items():  # type: ignore[union-attr]
        kinds = [type(p).__name__ for p in plist if not isinstance(p, ours)]
        if kinds:
            found.setdefault(tensor, []).extend(kinds)
    return found


def detach_hook_weights(model: nn.Module) -> None:
    """The deprecated weight_norm/spectral_norm hooks leave the weight they computed last on the module as a non-leaf
    tensor, which ``copy.deepcopy`` refuses; every forward recomputes it, so a detached value changes nothing (a
    backward still running holds the computed tensor itself, not the attribute)."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                value = module.__dict__.get(hook.name)
                if isinstance(value, Tensor) and value.grad_fn is not None:
                    setattr(module, hook.name, value.detach())


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for a model with the deprecated weight_norm/spectral_norm hooks."""
    detach_hook_weights(model)
    return copy.deepcopy(model)


def fixed_weights(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The layers among ``names`` whose weight (``in_proj_weight`` for attention) cannot be changed in place for that
    layer alone, with the reason: another module holds the same tensor (zeroing, pruning or quantizing it would change
    both), or it is computed (weight_norm, spectral_norm, …: writing into it changes a temporary, nothing stays)."""
    ties = tied_parameters(model)
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        module = modules[name]
        attr = "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"
        others = ties.get(_qualified(name, attr))
        foreign = foreign_parametrizations(module).get(attr)
        if others:
            found[name] = f"its weight is tied to {', '.join(others)}"
        elif foreign:
            found[name] = f"its weight is computed by {', '.join(foreign)}"
    return found


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Tied weights: ``{qualified name: [the other qualified names holding the same tensor]}`` for every parameter of
    ``model`` that more than one module holds (a language model's output layer sharing the embedding's matrix, …).
    A module reachable under two names counts once (it computes the same thing either way); a parametrized tensor
    counts under the module it parametrizes (its latent ``original`` is the shared tensor)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # its `original` is counted below, under the module it belongs to
        for pname, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(_qualified(name, pname))
        if parametrize.is_parametrized(module):
            for pname, plist in module.parametrizations.items():  # type: ignore[union-attr]
                original = getattr(plist, "original", None)  # (a parametrization of several tensors has none)
                if original is not None:
                    holders.setdefault(id(original), []).append(_qualified(name, pname))
    return {n: [o for o in names if o != n] for names in holders.values() if len(names) > 1 for n in names}


def quantized_layers(model: nn.Module) -> list[QuantizedLayer]:
    """Every quantized tensor of ``model`` in module order."""
    found: list[QuantizedLayer] = []
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor in list(module.parametrizations.keys()):  # type: ignore[union-attr]
            if _is_installed(module, tensor):
                bias_name = None
                for cand in ("bias", "in_proj_bias"):
                    if parametrize.is_parametrized(module, cand) and any(
                        isinstance(p, BiasGate)
                        for p in module.parametrizations[cand]  # type: ignore[index]
                    ):
                        bias_name = cand
                found.append(QuantizedLayer(name, module, tensor, bias_name))
    return found


def remove_quantizers(model: nn.Module, bake: bool = True) -> None:
    """Remove all quantizers. With ``bake=True`` the layers keep the quantized weights (and gated biases)."""
    for layer in quantized_layers(model):
        if layer.bias is not None:
            parametrize.remove_parametrizations(layer.module, layer.bias, leave_parametrized=bake)
        parametrize.remove_parametrizations(layer.module, layer.tensor, leave_parametrized=bake)
    clear_batchnorm_gates(model)


# ---------------------------------------------------------------------------------------------------------------
# Batch-norm gating: a BN that directly follows a quantized layer is gated with that layer's alive mask, so a 0-bit
# channel is zero after the normalisation as well (and can be removed exactly). An affine BN gets the mask folded
# into γ and β (a parametrization: channel-sized work, exact in train and eval mode); a BN without affine parameters
# gets a forward hook that multiplies its output.
_GATES: weakref.WeakKeyDictionary[nn.Module, tuple[ChannelQuantizer, torch.utils.hooks.RemovableHandle | None]] = (
    weakref.WeakKeyDictionary()
)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d/3d, SyncBatchNorm
_GATES_VERSION = 0  # counts the changes of _GATES: a cache of paired_gates() is valid while it is unchanged


def gates_version() -> int:
    """A number that changes whenever a batch norm is gated or ungated (anywhere)."""
    return _GATES_VERSION


def _gates_changed() -> None:
    global _GATES_VERSION
    _GATES_VERSION += 1


def is_batchnorm(module: nn.Module) -> bool:
    """Batch norms the library gates, slices and folds (``SyncBatchNorm`` included)."""
    return isinstance(module, BN_TYPES)


def _gate_hook(quantizer_ref: weakref.ref[ChannelQuantizer]):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        q = quantizer_ref()
        if q is None or q.b.numel() != output.shape[1]:
            return output
        mask = (q.b > 0).reshape((1, -1) + (1,) * (output.dim() - 2))
        return output * mask

    return hook


def _affine(bn: nn.Module) -> bool:
    return getattr(bn, "weight", None) is not None and getattr(bn, "bias", None) is not None


def _remove_gate(bn: nn.Module, unregister: bool = False) -> None:
    """Unpair ``bn``'s gates (and drop a hook); with ``unregister``, also remove the gate parametrizations."""
    entry = _GATES.pop(bn, None)
    _gates_changed()
    if entry is not None and entry[1] is not None:
        entry[1].remove()
    for gate in _prepared_gates(bn):
        gate.set_quantizer(None)
    if unregister:
        for name in ("weight", "bias"):
            if parametrize.is_parametrized(bn, name) and isinstance(
                bn.parametrizations[name][0],  # type: ignore[index]
                BatchNormGate,
            ):
                parametrize.remove_parametrizations(bn, name, leave_parametrized=False)


def prepare_batchnorm_gates(model: nn.Module) -> int:
    """Register an unpaired (pass-through) :class:`BatchNormGate` on γ and β of every affine batch norm of ``model``
    that has none yet; :func:`gate_batchnorm` pairs them later without re-registering anything. Returns how many batch
    norms were prepared. Call it before a DDP wrapper is built."""
    count = 0
    for module in model.modules():
        if is_batchnorm(module) and _affine(module) and not parametrize.is_parametrized(module):
            for name in ("weight", "bias"):
                parametrize.register_parametrization(module, name, BatchNormGate(None))
            count += 1
    return count


def _prepared_gates(bn: nn.Module) -> list[BatchNormGate]:
    gates = []
    for name in ("weight", "bias"):
        if parametrize.is_parametrized(bn, name):
            first = bn.parametrizations[name][0]  # type: ignore[index]
            if isinstance(first, BatchNormGate):
                gates.append(first)
    return gates


def gate_quantizer(bn: nn.Module) -> ChannelQuantizer | None:
    """The quantizer whose 0-bit channels the gate of ``bn`` zeroes, or ``None`` (no gate, or an unpaired one): read
    from the gates folded into γ and β (a deep copy of the model keeps them), else from the registry (a hook gate)."""
    gates = _prepared_gates(bn)
    if len(gates) == 2 and gates[0].quantizer is not None and gates[0].quantizer is gates[1].quantizer:
        return gates[0].quantizer
    entry = _GATES.get(bn)
    return entry[0] if entry is not None else None


def gate_batchnorm(bn: nn.Module, quantizer: ChannelQuantizer) -> None:
    """Zero the outputs of ``bn`` on the channels where ``quantizer`` has 0 bits (idempotent).

    An affine batch norm gets the mask folded into γ and β (pairing prepared gates, or registering new ones); one
    without affine parameters gets a forward hook on its output."""
    if bn in _GATES:
        if _GATES[bn][0] is quantizer:
            return
        _remove_gate(bn)
    gates = _prepared_gates(bn)
    if not gates and _affine(bn) and not parametrize.is_parametrized(bn):
        for name in ("weight", "bias"):
            parametrize.register_parametrization(bn, name, BatchNormGate(None))
        gates = _prepared_gates(bn)
    if gates:
        for gate in gates:
            gate.set_quantizer(quantizer)
        _GATES[bn] = (quantizer, None)
    else:
        _GATES[bn] = (quantizer, bn.register_forward_hook(_gate_hook(weakref.ref(quantizer))))
    _gates_changed()


def paired_gates(layers: list[QuantizedLayer]) -> list[tuple[BiasGate, Tensor, ChannelQuantizer]]:
    """(gate, the tensor it gates, its quantizer) for the bias gates of ``layers`` and the batch-norm gates folded
    into γ/β that those layers' quantizers drive."""
    out: list[tuple[BiasGate, Tensor, ChannelQuantizer]] = []
    mine: dict[int, ChannelQuantizer] = {}
    for layer in layers:
        try:
            q = layer.quantizer
            mine[id(q)] = q
            if layer.bias is not None:
                plist = layer.module.parametrizations[layer.bias]  # type: ignore[index]
                if isinstance(plist[0], BiasGate) and plist[0].quantizer is q:
                    out.append((plist[0], plist.original, q))
        except (AttributeError, KeyError, IndexError):  # quantizers removed by hand since
            continue
    for bn, (q, hook) in list(_GATES.items()):
        if hook is not None or id(q) not in mine:
            continue
        for name in ("weight", "bias"):
            if parametrize.is_parametrized(bn, name):
                plist = bn.parametrizations[name]  # type: ignore[index]
                if isinstance(plist[0], BatchNormGate) and plist[0].quantizer is q:
                    out.append((plist[0], plist.original, q))
    return out


def batchnorm_gates(model: nn.Module) -> Iterator[tuple[str, nn.Module, ChannelQuantizer]]:
    """(name, bn, quantizer) for every gated batch-norm inside ``model``."""
    for name, module in model.named_modules():
        if module in _GATES:
            yield name, module, _GATES[module][0]


def clear_batchnorm_gates(model: nn.Module) -> None:
    """Remove every batch-norm gate inside ``model``, prepared ones included (γ and β keep their own values)."""
    for module in list(model.modules()):
        if is_batchnorm(module):
            _remove_gate(module, unregister=True)


class BatchNormFollowerRecorder:
    """Records, during forward passes, which batch norm consumes a quantized layer's output *directly*.

    Used by the callback around the first training forward, and by :func:`gate_following_batchnorms`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pairs: set[tuple[str, str]] = set()
        self._outputs: list[tuple[Tensor, str]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> None:
        names = {m: n for n, m in self.model.named_modules()}
        for layer in quantized_layers(self.model):
            if layer.tensor != "weight":
                continue

            # identity comparisons only (no id() keys): traceable inside a user's torch.compile'd step
            def record(module: nn.Module, args: tuple, output: object, _name: str = layer.name) -> None:
                if isinstance(output, Tensor):
                    self._outputs.append((output, _name))

            self._handles.append(layer.module.register_forward_hook(record))
        for module in self.model.modules():
            if is_batchnorm(module):

                def consume(module: nn.Module, args: tuple, _bn: str = names[module]) -> None:
                    for output, name in self._outputs:
                        if args and output is args[0]:
                            self.pairs.add((_bn, name))

                self._handles.append(module.register_forward_pre_hook(consume))

    def stop(self) -> list[tuple[str, str]]:
        """Remove the hooks; return sorted ``(batch-norm name, quantized layer name)`` pairs."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = []
        return sorted(self.pairs)


def apply_batchnorm_gates(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Gate each named batch norm with the quantizer of its named producer."""
    modules = dict(model.named_modules())
    layers = {layer.name: layer for layer in quantized_layers(model)}
    for bn_name, layer_name in pairs:
        if bn_name in modules and layer_name in layers:
            gate_batchnorm(modules[bn_name], layers[layer_name].quantizer)


def gate_following_batchnorms(model: nn.Module, *example_args: object) -> list[tuple[str, str]]:
    """Find (one eval-mode forward on ``example_args``) and gate every batch norm fed directly by a quantized layer.

    Nothing else is left on the model: the recording hooks are removed and train/eval modes restored, even on error.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> _ = install_quantizers(net)
        >>> gate_following_batchnorms(net, torch.zeros(1, 1, 5, 5))
        [('1', '0')]
    """
    recorder = BatchNormFollowerRecorder(model)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        recorder.start()
        with torch.no_grad():
            model(*example_args)
    finally:
        pairs = recorder.stop()
        for m, mode in modes.items():
            m.train(mode)
    apply_batchnorm_gates(model, pairs)
    return pairs
