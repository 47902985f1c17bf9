"""Physical channel removal that keeps a model, its quantizers and its optimizer state consistent.

Dependencies (residual additions, concatenations, flatten → Linear, batch norms) come from torch-pruning's
dependency graph; the slicing itself is done here, so that quantizer parameters ``b``/``e``, parametrized weights
and the optimizer state (Adam moments, momentum buffers) shrink with their tensors. Every removal is a transaction:
outputs are compared before and after on example inputs, and any mismatch or error restores the model (and the
optimizers) exactly as they were.
"""

from __future__ import annotations

import bisect
import contextlib
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from lightning_xai.pruning.heads import (
    dead_heads,
    head_removal_problem,
    head_rows,
    settle_encoders,
    sync_heads,
)
from lightning_xai.quantization.batched import per_layer_quantization
from lightning_xai.quantization.install import (
    BN_TYPES,
    QuantizedLayer,
    foreign_parametrizations,
    gate_quantizer,
    quantized_layers,
)
from lightning_xai.quantization.quantizer import ChannelQuantizer
from lightning_xai.quantization.ste import channels_last

__all__ = [
    "resize_to_state_dict",
    "padded_state_dict",
    "effective_state_dict",
    "original_shapes",
    "tensor_layout",
    "restore_layout",
    "align_gate_keys",
    "plain_gate_keys",
    "remove_dead_channels",
    "RemovalReport",
    "dead_channels",
    "ChannelCut",
    "apply_cuts",
    "execution_order",
]

_PASS_THROUGH = {
    tp.ops.OPTYPE.ELEMENTWISE,
    tp.ops.OPTYPE.RESHAPE,
    tp.ops.OPTYPE.CONCAT,
    tp.ops.OPTYPE.SPLIT,
    tp.ops.OPTYPE.UNBIND,
    tp.ops.OPTYPE.EXPAND,
    tp.ops.OPTYPE.SLICE,
}
_BN_TYPES = BN_TYPES


# ----------------------------------------------------------------------------------------------------------------
# Tensor access that sees through parametrizations


def _param_slot(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(owner, attribute) holding the stored tensor ``name`` of ``module`` (the original if parametrized)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name], "original"  # type: ignore[index]
    return module, name


def _get(module: nn.Module, name: str) -> Tensor | None:
    owner, attr = _param_slot(module, name)
    return getattr(owner, attr, None)


def _quantizer(module: nn.Module, name: str = "weight") -> nn.Module | None:
    if parametrize.is_parametrized(module, name):
        first = module.parametrizations[name][0]  # type: ignore[index]
        return first if isinstance(first, ChannelQuantizer) else None  # not a batch-norm gate
    return None


def _set_tensor(owner: nn.Module, attr: str, value: Tensor, like: Tensor) -> Tensor:
    if isinstance(like, nn.Parameter):
        new: Tensor = nn.Parameter(value, requires_grad=like.requires_grad)
        setattr(owner, attr, new)
    else:
        owner._buffers[attr] = value
        new = value
    return new


def _sync_attributes(module: nn.Module) -> None:
    """Make ``out_channels``/``in_features``/``num_features``... agree with the stored tensors."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        w = _get(module, "weight")
        assert w is not None
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = w.shape[0]
        if depthwise:
            module.in_channels = module.groups = w.shape[0]
        else:
            module.in_channels = w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        w = _get(module, "weight")
        assert w is not None
        module.out_features, module.in_features = w.shape[0], w.shape[1]
    elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        w = _get(module, "in_proj_weight")
        assert w is not None
        sync_heads(module, w.shape[0])
    elif isinstance(module, _BN_TYPES):
        ref = module.running_mean if module.running_mean is not None else _get(module, "weight")
        if ref is not None:
            module.num_features = ref.shape[0]


_PARAM_KEY = ".parametrizations."


def _gate_key(key: str, state_dict: dict[str, Tensor]) -> tuple[str, str] | None:
    """``(owner, tensor)`` when ``key`` is ``owner.parametrizations.tensor.original`` of a parametrization without
    parameters of its own (a batch-norm gate, not a quantizer with ``b``/``e``), else None."""
    if not key.endswith(".original") or _PARAM_KEY not in f".{key}":
        return None
    if f"{key[: -len('.original')]}.0.b" in state_dict:
        return None
    prefix, _, rest = f".{key}".partition(_PARAM_KEY)
    return prefix[1:], rest[: -len(".original")]


def _join(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def plain_gate_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with the keys of batch-norm gates in their plain form (``bn.weight``), order kept."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        gate = _gate_key(key, state_dict)
        out[key if gate is None else _join(*gate)] = value
    return out


def align_gate_keys(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Rename, in place, the keys of batch-norm gates between their plain form ``bn.weight`` and their parametrized
    form ``bn.parametrizations.weight.original``, to whatever ``model`` has now.

    Checkpoints store gated batch norms under plain keys (the gates are re-applied from the callback state after
    the model is restored); a state dict taken from a live gated model has the parametrized keys.
    """
    modules = dict(model.named_modules())
    for key in list(state_dict):
        gate = _gate_key(key, state_dict)
        if gate is not None:
            module = modules.get(gate[0])
            if module is not None and not parametrize.is_parametrized(module, gate[1]):
                state_dict[_join(*gate)] = state_dict.pop(key)
            continue
        owner, _, tensor = key.rpartition(".")
        module = modules.get(owner)
        if module is not None and parametrize.is_parametrized(module, tensor):
            if not isinstance(module.parametrizations[tensor][0], ChannelQuantizer):  # type: ignore[index]
                state_dict[_join(owner, f"parametrizations.{tensor}.original")] = state_dict.pop(key)


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> list[str]:
    """Resize every tensor of ``model`` whose shape differs from ``state_dict`` (e.g. a checkpoint of a pruned model).

    Works for plain and parametrized (quantized) models; module attributes such as ``out_channels`` follow. The
    values are not copied: call ``load_state_dict`` afterwards. Keys of batch-norm gates are first aligned with the
    model (:func:`align_gate_keys`). Returns the resized keys.
    """
    align_gate_keys(model, state_dict)
    resized: list[str] = []
    touched: set[nn.Module] = set()
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue
        current = owner._parameters.get(attr, owner._buffers.get(attr))
        if current is None or current.shape == value.shape:
            continue
        layout = torch.channels_last if channels_last(current) else torch.contiguous_format  # the model's, kept
        fresh = torch.empty(value.shape, dtype=current.dtype, device=current.device, memory_format=layout)
        _set_tensor(owner, attr, fresh, current)
        resized.append(key)
        # the layer that owns the tensor: for "conv.parametrizations.weight.original" (or ".0.b") that is "conv"
        layer_name = (
            owner_name.split(".parametrizations")[0] if "parametrizations" in owner_name.split(".") else owner_name
        )
        if layer_name == "parametrizations":
            layer_name = ""
        touched.add(modules[layer_name])
    for module in touched:
        _sync_attributes(module)
    settle_encoders(model)
    return resized


# ----------------------------------------------------------------------------------------------------------------
# Dead channels and their dependency groups


def dead_channels(layer: QuantizedLayer) -> list[int]:
    """Output channels of ``layer`` at 0 bits (they output exactly zero)."""
    return torch.nonzero(~layer.quantizer.alive()).flatten().tolist()


@dataclass(frozen=True)
class ChannelCut:
    """Remove indices ``idxs`` along the output (``out``) or input (``in``) dimension of module ``name``."""

    name: str
    kind: str  # "out" | "in"
    idxs: tuple[int, ...]


@dataclass
class RemovalReport:
    """What :func:`remove_dead_channels` did."""

    removed: dict[str, int] = field(default_factory=dict)  # layer -> output channels removed
    removed_idxs: dict[str, list[int]] = field(default_factory=dict)  # any sliced layer -> removed output indices
    rejected: dict[str, str] = field(default_factory=dict)  # layer -> reason the dead channels stayed
    heads_removed: dict[str, int] = field(default_factory=dict)  # attention -> whole heads removed
    idle: dict[str, int] = field(default_factory=dict)  # layer -> removed channels that were not at 0 bits but
    # whose every consumer is silent (all its output rows at 0 bits), so they contributed exactly nothing
    cuts: list[ChannelCut] = field(default_factory=list)  # what was applied (to replay it on other ranks)
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.removed)


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels == module.out_channels


# torch-pruning's flatten mapping multiplies every index by the flattened size. Through Swin-T's window reshapes (a
# cycle of view/permute ops around the last stage's residual stream) its traversal re-expands them without end and
# exhausted 24 GB here (the same MemoryError is reported upstream, VainF/Torch-Pruning#525). A legitimate group never
# needs more indices than a layer has input features, so a group passing this bound is abandoned with a reason.
_MAX_GROUP_INDICES = 1 << 20
# The other way it fails to end: the traversal cycles with new index lists of bounded size, adding dependencies
# without end, each checked against all before it (a tiny Swin at 32x32 ran for minutes). A group touches each node
# of the graph a few times at most, each with at most the widest layer's indices (torchvision's ViT-B/16: 504 items
# ≈ 0.4 M indices, far below its bound of 4 × 236 nodes × 3,072), so the group's indices in all are bounded too.
_NODE_VISITS = 4


def _group_total_limit(DG: tp.DependencyGraph) -> int:
    widths = [1]
    for m in DG.module2node:
        if isinstance(m, nn.Linear):
            widths += [m.in_features, m.out_features]
        elif isinstance(m, nn.modules.conv._ConvNd):
            widths += [m.in_channels, m.out_channels]
    return _NODE_VISITS * len(DG.module2node) * max(widths)


class _IndexExplosion(Exception):
    pass


@contextlib.contextmanager
def _bounded_index_mappings(total_limit: int, limit: int | None = None) -> Iterator[None]:
    limit = _MAX_GROUP_INDICES if limit is None else limit
    try:
        from torch_pruning.dependency.group import Group
        from torch_pruning.dependency.index_mapping import _FlattenIndexMapping
    except ImportError:  # pragma: no cover - other torch-pruning layouts: no bound (their own behaviour)
        yield
        return
    original, add_dep = _FlattenIndexMapping.__call__, Group.add_dep

    def bounded(self: Any, idxs: Any) -> Any:
        grown = len(idxs) * (1 if self.reverse else int(getattr(self, "_stride", 1)))
        if grown > limit:  # checked before the expansion: building 33 M index objects alone took a minute
            raise _IndexExplosion(f"{grown:,} indices")
        return original(self, idxs)

    def bounded_add(self: Any, dep: Any, idxs: Any) -> None:
        total = getattr(self, "_lx_total", 0) + len(idxs)
        if total > total_limit:
            raise _IndexExplosion(f"{total:,} indices over {len(self._group):,} coupled operations")
        self._lx_total = total
        add_dep(self, dep, idxs)

    _FlattenIndexMapping.__call__ = bounded  # type: ignore[method-assign]
    Group.add_dep = bounded_add  # type: ignore[method-assign]
    try:
        yield
    finally:
        _FlattenIndexMapping.__call__ = original  # type: ignore[method-assign]
        Group.add_dep = add_dep  # type: ignore[method-assign]


def pruning_group(DG: tp.DependencyGraph, module: nn.Module, fn: Any, idxs: Sequence[int]) -> tuple[Any, str | None]:
    """``DG.get_pruning_group`` with a bound on its index mappings: ``(group, None)``, or ``(None, reason)`` when the
    traversal does not terminate (see ``_MAX_GROUP_INDICES``)."""
    with _bounded_index_mappings(_group_total_limit(DG)):
        try:
            return DG.get_pruning_group(module, fn, list(idxs)), None
        except _IndexExplosion as err:
            return None, (
                f"torch-pruning's dependency tracing of its channels does not terminate (index mappings through "
                f"reshapes reach {err.args[0]}), so its coupled layers are unknown; left alone"
            )


# ----------------------------------------------------------------------------------------------------------------
# Channels that are exactly zero whatever the input: a 0-bit channel of a conv/linear layer (its bias gated), the
# gated batch norm after it, and what element-wise operations make of zeros. Written by hand over torch-pruning's
# graph, which knows which layers are coupled but not which coupled channels carry nothing: in a squeeze-excitation
# block (MobileNet-V3, EfficientNet) a channel whose depthwise convolution is at 0 bits is zero after its gated batch
# norm and activation, so it is zero after the excitation's product too, whatever the expansion layer and the
# excitation's second layer (coupled producers, still at some bits) do on that channel: all of them can go.

# autograd nodes whose output is exactly zero wherever their input is: f(0) = 0 per element, or pooling within a
# channel (max or mean of zeros)
_ZERO_KEEPING = frozenset(
    {
        "ReluBackward0",
        "SiluBackward0",
        "GeluBackward0",
        "HardswishBackward0",
        "LeakyReluBackward0",
        "EluBackward0",
        "CeluBackward0",
        "SeluBackward0",
        "MishBackward0",
        "TanhBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
    }
)
_POOLING = frozenset(
    {
        "MaxPool2DWithIndicesBackward0",
        "MaxPool1DWithIndicesBackward0",
        "AvgPool2DBackward0",
        "AvgPool1DBackward0",
        "AdaptiveAvgPool2DBackward0",
        "AdaptiveAvgPool1DBackward0",
        "AdaptiveMaxPool2DBackward0",
        "AdaptiveMaxPool1DBackward0",
    }
)
# other element-wise operations that map each channel to the same channel (values need not stay zero)
_CHANNELWISE = (
    _ZERO_KEEPING
    | _POOLING
    | frozenset(
        {
            "MulBackward0",
            "AddBackward0",
            "SubBackward0",
            "DivBackward0",
            "HardtanhBackward0",
            "SigmoidBackward0",
            "HardsigmoidBackward0",
            "ExpBackward0",
            "NegBackward0",
            "AbsBackward0",
            "SoftplusBackward0",
        }
    )
)
_CONV_LAYOUT = "channels first"  # (N, C, ...): what convolutions and batch norms produce
_LINEAR_LAYOUT = "channels last"  # (..., C): what linear layers produce


class _Silence:
    """Which channels of each node of a dependency graph are exactly zero for every input.

    ``zero_out`` maps a module to the output channels it always outputs zero on (0-bit channels of a quantized layer
    whose bias is gated or absent; the gated channels of a batch norm). Propagation is conservative: an operation not
    listed here (reshapes, concatenations, attention, sigmoid, …) has no zero channels. Channel indices are followed
    only through operations that keep them (element-wise ones, batch norms, depthwise convolutions), and pooling is
    trusted only on tensors known to be channels-first."""

    def __init__(self, zero_out: Mapping[nn.Module, set[int]]) -> None:
        self.zero_out = zero_out
        self._memo: dict[int, tuple[frozenset[int], str | None]] = {}

    def at(self, node: Any) -> tuple[frozenset[int], str | None]:
        """(zero channels, layout) of ``node``'s output."""
        key = id(node)
        if key not in self._memo:
            self._memo[key] = (frozenset(), None)  # a cycle (none expected in a traced graph) proves nothing
            self._memo[key] = self._compute(node)
        return self._memo[key]

    def _compute(self, node: Any) -> tuple[frozenset[int], str | None]:
        none: tuple[frozenset[int], str | None] = (frozenset(), None)
        module, kind = node.module, node.type
        own = frozenset(self.zero_out.get(module, ()))
        if kind == tp.ops.OPTYPE.CONV or kind == tp.ops.OPTYPE.BN:
            return own, _CONV_LAYOUT
        if kind == tp.ops.OPTYPE.LINEAR:
            return own, _LINEAR_LAYOUT
        if kind == tp.ops.OPTYPE.DEPTHWISE_CONV:
            # zero input channel -> zero output channel, unless a bias is added to it
            if _is_depthwise(module) and _get(module, "bias") is None:
                # from the data input (a parametrized weight is an input node too, without zero channels)
                own = own.union(*(z for z, layout in map(self.at, node.inputs) if layout == _CONV_LAYOUT))
            return own, _CONV_LAYOUT
        if kind != tp.ops.OPTYPE.ELEMENTWISE or node.grad_fn is None:
            return none
        op = node.grad_fn.name()
        inputs = [self.at(n) for n in node.inputs]
        if not inputs:
            return none
        layouts = {layout for zeros, layout in inputs if zeros}
        if len(layouts) > 1:
            return none  # operands of different layouts: their channel indices need not agree
        layout = layouts.pop() if layouts else inputs[0][1]
        if op == "MulBackward0":  # a product is zero where any factor is
            return frozenset().union(*(zeros for zeros, _ in inputs)), layout
        if op in ("AddBackward0", "SubBackward0"):  # a sum is zero where every term is (a constant term: nowhere)
            if len(inputs) < 2:
                return none
            return frozenset.intersection(*(zeros for zeros, _ in inputs)), layout
        if len(inputs) != 1:
            return none
        zeros, layout = inputs[0]
        if op in _ZERO_KEEPING:
            return zeros, layout
        if op == "HardtanhBackward0":  # ReLU6 and other clamps whose range holds 0
            low, high = getattr(node.grad_fn, "_saved_min_val", 1), getattr(node.grad_fn, "_saved_max_val", -1)
            return (zeros, layout) if low <= 0 <= high else none
        if layout != _CONV_LAYOUT:
            return none
        if op in _POOLING:
            return zeros, layout
        if op == "MeanBackward1" and _spatial_mean(node.grad_fn):  # squeeze-excitation's pooling
            return zeros, layout
        return none

    def silent(self, group: Any, root: set[int], DG: tp.DependencyGraph) -> set[int]:
        """The channels of ``root`` (the group's own indices) that every consumer of ``group`` receives as exact
        zeros; empty when the group maps indices (concatenations, flattening) or a consumer sees a live value."""
        found = set(root)
        consumers = 0
        for dep, idxs in group:
            if set(idxs) != root:
                return set()  # indices mapped on the way: identity is assumed below
            target = dep.target
            if target.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR) and DG.is_in_channel_pruning_fn(dep.handler):
                consumers += 1
                found &= self.at(dep.source)[0]  # the node whose output channels are the consumer's inputs
            elif target.type == tp.ops.OPTYPE.ELEMENTWISE and target.inputs:
                op = target.grad_fn.name() if target.grad_fn is not None else ""
                if not (op in _CHANNELWISE or (op == "MeanBackward1" and _spatial_mean(target.grad_fn))):
                    return set()  # the channels leave the group another way (a reduction over them, a matmul, ...)
            elif target.type not in (
                tp.ops.OPTYPE.CONV,
                tp.ops.OPTYPE.LINEAR,
                tp.ops.OPTYPE.DEPTHWISE_CONV,
                tp.ops.OPTYPE.BN,
                tp.ops.OPTYPE.ELEMENTWISE,  # without inputs: a weight's parametrization, sliced with its layer
            ):
                return set()  # model outputs, reshapes, concatenations, attention: not followed here
        return found if consumers else set()


def _spatial_mean(grad_fn: Any) -> bool:
    """Whether a ``MeanBackward1`` node averaged a channels-first tensor over its spatial dimensions only."""
    sizes = tuple(getattr(grad_fn, "_saved_self_sym_sizes", ()))
    dims = {int(d) % len(sizes) for d in getattr(grad_fn, "_saved_dim", ())} if sizes else set()
    return len(sizes) >= 3 and dims == set(range(2, len(sizes)))


def _zero_outputs(model: nn.Module, layers: Sequence[QuantizedLayer], dead: Mapping[str, set[int]]) -> dict:
    """Module -> the output channels it outputs exactly zero on, whatever its input: the ``dead`` channels of a
    quantized conv/linear layer (its bias, if any, is gated), and the same channels of the batch norm its quantizer
    gates (γ = β = 0 there)."""
    out: dict[nn.Module, set[int]] = {}
    by_quantizer = {id(layer.quantizer): layer.name for layer in layers}
    for layer in layers:
        module = layer.module
        if layer.tensor == "weight" and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            if layer.bias is not None or _get(module, "bias") is None:  # an ungated bias would still be output
                out[module] = set(dead.get(layer.name, ()))
    for bn in model.modules():
        if isinstance(bn, _BN_TYPES):
            quantizer = gate_quantizer(bn)
            name = None if quantizer is None else by_quantizer.get(id(quantizer))
            if name is not None:
                out[bn] = set(dead.get(name, ()))
    return out


def _group_cuts(
    group: Any,
    DG: tp.DependencyGraph,
    names: dict[nn.Module, str],
    dead: dict[str, set[int]] | None,
    silence: _Silence | None = None,
) -> tuple[list[ChannelCut], str | None]:
    """Translate a torch-pruning group into cuts, or give the reason it cannot be removed exactly.

    With ``dead`` given, every coupled producer must be dead on the group's channels, or (with ``silence``) every
    consumer must receive them as exact zeros; ``None`` skips that check.
    """
    cuts: list[ChannelCut] = []
    alive: tuple[str, set[int]] | None = None  # a coupled producer still using some of the channels
    for dep, idxs in group:
        target = dep.target
        if target.type in _PASS_THROUGH:
            continue
        module = target.module
        if target.type == tp.ops.OPTYPE.OUTPUT:
            return [], "its channels are model outputs"
        name = names.get(module)
        if name is None and isinstance(module, nn.Parameter):
            pname = getattr(DG, "_param_to_name", {}).get(module, "a parameter")
            return [], (
                f"it is coupled with {pname!r}, a parameter the model uses directly in its forward (such as a class "
                "token concatenated to, or a positional embedding added to, its channels), which is not sliced here"
            )
        if name is None:
            return [], f"it is coupled with {type(module).__name__}, which cannot be sliced here"
        if getattr(module, "transposed", False):
            return (
                [],
                f"it is coupled with {name} ({type(module).__name__}), a transposed convolution (not sliced here)",
            )
        shared = _tied_with(module, names)
        if shared:
            return [], f"it is coupled with {name}, whose weight is tied to {shared} (removal would untie them)"
        foreign = foreign_parametrizations(module)
        if foreign:
            return [], f"it is coupled with {name}, {_parametrized_by(foreign)} (not sliced here)"
        is_out = DG.is_out_channel_pruning_fn(dep.handler)
        is_in = DG.is_in_channel_pruning_fn(dep.handler)
        if target.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.DEPTHWISE_CONV) and module.groups != 1:
            if not _is_depthwise(module):
                return [], f"it is coupled with {name}, a grouped convolution (not sliced here)"
            if is_out or is_in:  # a depthwise conv loses the channel as a whole: slice its output dimension once
                cuts.append(ChannelCut(name, "out", tuple(sorted(set(idxs)))))
                continue
        if target.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR):
            if is_out:
                missing = set(idxs) - dead.get(name, set()) if dead is not None else set()
                if missing and alive is None:
                    alive = (name, missing)
                cuts.append(ChannelCut(name, "out", tuple(sorted(set(idxs)))))
            elif is_in:
                cuts.append(ChannelCut(name, "in", tuple(sorted(set(idxs)))))
            else:  # pragma: no cover - defensive
                return [], f"unknown pruning function on {name}"
        elif target.type == tp.ops.OPTYPE.BN and isinstance(module, _BN_TYPES):
            cuts.append(ChannelCut(name, "out", tuple(sorted(set(idxs)))))
        elif isinstance(module, nn.MultiheadAttention):
            return [], (
                f"it is coupled with {name} (MultiheadAttention), whose embedding width is split across its heads "
                "and is not sliced here"
            )
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
            return [], (
                f"it is coupled with {name} ({type(module).__name__}), which normalises across the channels: "
                "removing a channel changes the statistics of all the others, so the outputs cannot stay the same"
            )
        else:
            return [], f"it is coupled with {name} ({type(module).__name__}), which cannot be sliced here"
    if not any(c.kind == "in" for c in cuts):
        return [], "no layer consumes its channels (they are model outputs)"
    if alive is not None:
        root = set(next(iter(group))[1])
        if silence is None or not root <= silence.silent(group, root, DG):
            return [], f"coupled layer {alive[0]} still uses channels {sorted(alive[1])[:8]}"
    return cuts, None


def _unseen_reason(model: nn.Module, name: str) -> str:
    """Why the dependency graph has no node for layer ``name``: called functionally by a parent (``out_proj`` of
    ``nn.MultiheadAttention``), or not reached by the example input."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else None
    if isinstance(parent, nn.MultiheadAttention):
        return (
            f"its output channels are the embedding width of its MultiheadAttention {parent_name!r} (which calls it "
            "functionally), the residual stream of the block: nn.MultiheadAttention ties that width to its input, so "
            "they are not sliced (dead heads go through the attention's in_proj rows and this layer's input columns)"
        )
    return "the dependency tracer did not see it as a module call on the example input (unused, or used functionally)"


def _stored_weight(module: nn.Module) -> Tensor | None:
    """The stored ``weight`` tensor (the original if parametrized), without computing a parametrization."""
    if parametrize.is_parametrized(module, "weight"):  # (a parametrization of several tensors has no `original`)
        return getattr(module.parametrizations["weight"], "original", None)  # type: ignore[index]
    w = module._parameters.get("weight")
    return w if isinstance(w, Tensor) else None


def _parametrized_by(foreign: dict[str, list[str]]) -> str:
    """Why a layer with other parametrizations is not sliced: slicing their latent tensors (weight_norm's direction,
    spectral_norm's power-iteration vectors, …) would change what the layer computes."""
    kinds = "; ".join(f"{tensor} by {', '.join(k)}" for tensor, k in foreign.items())
    return f"whose tensors are parametrized ({kinds}): slicing their latent tensors would change what it computes"


def _tied_with(module: nn.Module, names: dict[nn.Module, str]) -> list[str]:
    """Other modules holding the very same weight tensor as ``module`` (tied weights)."""
    w = _stored_weight(module)
    if w is None:
        return []
    return sorted(n for m, n in names.items() if m is not module and _stored_weight(m) is w)


def _out_tensors(module: nn.Module) -> list[str]:
    if isinstance(module, nn.MultiheadAttention):  # output rows of the packed query/key/value projection
        return ["in_proj_weight", "in_proj_bias"]
    if isinstance(module, _BN_TYPES):
        return ["weight", "bias", "running_mean", "running_var"]
    return ["weight", "bias"]


# ----------------------------------------------------------------------------------------------------------------
# Where each kept slice came from: per stored tensor, its shape before any removal and, per sliced dimension, the
# original indices still present. This is what turns a physically smaller model back into a full-size state dict
# with zeros where channels were removed (checkpoints that load into a fresh instance of the user's class).

_ORIGIN: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple[int, ...], dict[int, Tensor]]]] = (
    weakref.WeakKeyDictionary()
)


def _origin(owner: nn.Module, attr: str) -> tuple[tuple[int, ...], dict[int, Tensor]] | None:
    return _ORIGIN.get(owner, {}).get(attr)


def _set_origin(owner: nn.Module, attr: str, record: tuple[tuple[int, ...], dict[int, Tensor]] | None) -> None:
    slots = _ORIGIN.setdefault(owner, {})
    if record is None:
        slots.pop(attr, None)
    else:
        slots[attr] = record


def _compose_origin(owner: nn.Module, attr: str, old: Tensor, keeps: list[tuple[int, Tensor]]):
    shape, dims = _origin(owner, attr) or (tuple(old.shape), {})
    dims = dict(dims)
    for dim, keep in keeps:
        base = dims.get(dim, torch.arange(old.shape[dim]))
        dims[dim] = base[keep.cpu()]
    return shape, dims


def tensor_layout(model: nn.Module) -> dict[str, tuple[list[int], dict[int, list[int]]]]:
    """``{plain tensor name: (original shape, {dim: original indices kept})}`` for every tensor channels were removed
    from (plain data, for a checkpoint)."""
    out = {}
    for name, module in model.named_modules():
        for tensor in _tensor_names(module):
            record = _origin(*_param_slot(module, tensor))
            if record is not None:
                out[f"{name}.{tensor}" if name else tensor] = (
                    list(record[0]),
                    {d: idx.tolist() for d, idx in record[1].items()},
                )
    return out


def restore_layout(model: nn.Module, layout: dict[str, Any]) -> None:
    """Put back what :func:`tensor_layout` recorded (after a checkpoint of a pruned model was loaded)."""
    modules = dict(model.named_modules())
    for key, (shape, dims) in layout.items():
        owner_name, _, tensor = key.rpartition(".")
        module = modules.get(owner_name)
        if module is not None:
            _set_origin(
                *_param_slot(module, tensor),
                (tuple(shape), {int(d): torch.tensor(idx, dtype=torch.long) for d, idx in dims.items()}),
            )


def _tensor_names(module: nn.Module) -> list[str]:
    """The state tensors a plain instance of ``module`` would own (parametrized ones under their plain name)."""
    names = [n for n in module._parameters if module._parameters[n] is not None]
    names += [
        n for n in module._buffers if module._buffers[n] is not None and n not in module._non_persistent_buffers_set
    ]
    if parametrize.is_parametrized(module):  # a tensor parametrized by weight_norm & co. keeps its latent tensors
        foreign = foreign_parametrizations(module)
        names += [n for n in module.parametrizations.keys() if n not in foreign]  # type: ignore[union-attr]
    return names


def _plain_tensors(model: nn.Module):
    """``(plain key, module, tensor name)`` for every state tensor a plain instance of the architecture would have."""
    from lightning_xai.quantization.quantizer import BiasGate, ChannelQuantizer

    for name, module in model.named_modules():
        if isinstance(module, (ChannelQuantizer, BiasGate)):
            continue
        if isinstance(module, parametrize.ParametrizationList) and all(
            isinstance(p, (ChannelQuantizer, BiasGate)) for p in module
        ):
            continue  # ours: its tensor appears under the plain name; another's keeps its latent tensors (original0…)
        for tensor in _tensor_names(module):
            yield (f"{name}.{tensor}" if name else tensor), module, tensor


def effective_state_dict(model: nn.Module, pad: bool = False) -> dict[str, Tensor]:
    """The state dict of a plain model computing exactly what ``model`` computes now: quantized weights as their
    values, gated batch norms with their gates applied, quantizer parameters left out, plain keys. With ``pad``,
    every removed channel is put back in place as zeros, so a plain *full-size* instance loads it (a removed producer
    channel outputs zero; zero input columns ignore it; a batch norm with γ = β = 0 on it outputs zero)."""
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, module, tensor in _plain_tensors(model):
            value = getattr(module, tensor).detach()
            record = _origin(*_param_slot(module, tensor)) if pad else None
            if record is not None:
                shape, dims = record
                for dim, idx in sorted(dims.items()):
                    full = list(value.shape)
                    full[dim] = shape[dim]
                    value = value.new_zeros(full).index_copy_(dim, idx.to(value.device), value)
            out[key] = value.clone()
    return out


def padded_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """:func:`effective_state_dict` with removed channels back in place as zeros (full-size, plain)."""
    return effective_state_dict(model, pad=True)


def original_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The shape of every plain state tensor before any channel was removed (what a fresh instance has)."""
    out = {}
    for key, module, tensor in _plain_tensors(model):
        record = _origin(*_param_slot(module, tensor))
        out[key] = list(record[0]) if record is not None else list(getattr(module, tensor).shape)
    return out


@dataclass
class _Edit:
    owner: nn.Module
    attr: str
    old: Tensor
    new: Tensor
    keeps: list[tuple[int, Tensor]]  # (dim, kept indices), applied in order
    origin: tuple | None = None  # the slot's origin record before this edit (restored on rollback)

    def slice(self, value: Tensor) -> Tensor:
        """``value`` without the removed indices: a fresh tensor, channels_last when ``value`` is (``index_select``
        returns contiguous tensors; a channels_last model must keep its layout through removals)."""
        cl = channels_last(value)
        for dim, keep in self.keeps:
            value = value.index_select(dim, keep.to(value.device))
        return value.clone(memory_format=torch.channels_last) if cl else value.clone()


def apply_cuts(
    model: nn.Module,
    cuts: Iterable[ChannelCut],
    optimizers: Sequence[torch.optim.Optimizer] = (),
    edits: list[_Edit] | None = None,
) -> list[_Edit]:
    """Slice the tensors named by ``cuts`` (merging duplicates) and carry the optimizer state along.

    Each tensor is replaced once, sliced along every affected dimension (a layer can lose input and output
    channels in the same call). Every replacement is appended to ``edits`` as it happens, so a caller can roll back
    even when this function raises half-way. Returns ``edits``.
    """
    modules = dict(model.named_modules())
    merged: dict[tuple[str, str], set[int]] = defaultdict(set)
    for cut in cuts:
        merged[(cut.name, cut.kind)].update(cut.idxs)
    names = {m: n for n, m in modules.items()}
    for name, _ in merged:  # refuse before anything changes
        module = modules[name]
        if getattr(module, "transposed", False):
            raise ValueError(f"cannot remove channels of {name!r}: {type(module).__name__} is not supported")
        shared = _tied_with(module, names)
        if shared:
            raise ValueError(
                f"cannot remove channels of {name!r}: its weight is tied to {shared} and slicing would untie them; "
                "untie the weights or leave these layers out"
            )
        foreign = foreign_parametrizations(module)
        if foreign:
            raise ValueError(f"cannot remove channels of {name!r}: {_parametrized_by(foreign)}")
    edits = [] if edits is None else edits
    per_tensor: dict[tuple[int, str], tuple[nn.Module, str, dict[int, set[int]]]] = {}
    touched: set[nn.Module] = set()
    for (name, kind), idxs in merged.items():
        module = modules[name]
        specs: list[tuple[nn.Module, str, int]] = []
        if kind == "out":
            tensors = _out_tensors(module)
            for tensor in tensors:
                if _get(module, tensor) is not None:
                    owner, attr = _param_slot(module, tensor)
                    specs.append((owner, attr, 0))
            q = _quantizer(module, tensors[0])
            if q is not None:
                specs += [(q, "b", 0), (q, "e", 0)] + ([(q, "relief", 0)] if hasattr(q, "relief") else [])
        else:
            owner, attr = _param_slot(module, "weight")
            specs.append((owner, attr, 1))
        for owner, attr, dim in specs:
            entry = per_tensor.setdefault((id(owner), attr), (owner, attr, defaultdict(set)))
            entry[2][dim].update(idxs)
        touched.add(module)
    for owner, attr, dims in per_tensor.values():
        old = getattr(owner, attr)
        keeps: list[tuple[int, Tensor]] = []
        for dim in sorted(dims):
            kept = [i for i in range(old.shape[dim]) if i not in dims[dim]]  # host bookkeeping, one transfer
            keeps.append((dim, torch.tensor(kept, dtype=torch.long, device=old.device)))
        edit = _Edit(owner, attr, old, old, keeps, _origin(owner, attr))
        edit.new = _set_tensor(owner, attr, edit.slice(old.detach()), old)
        _set_origin(owner, attr, _compose_origin(owner, attr, old, keeps))
        edits.append(edit)
    for module in touched:
        _sync_attributes(module)
    settle_encoders(model)
    _remap_optimizers(optimizers, edits)
    return edits


def _remap_optimizers(optimizers: Sequence[torch.optim.Optimizer], edits: list[_Edit]) -> None:
    by_old = {id(e.old): e for e in edits if isinstance(e.old, nn.Parameter)}
    for opt in optimizers:
        for group in opt.param_groups:
            new_params = []
            for p in group["params"]:
                edit = by_old.get(id(p))
                if edit is None:
                    new_params.append(p)
                    continue
                state = opt.state.pop(p, None)
                if state is not None:
                    opt.state[edit.new] = {
                        k: edit.slice(v) if isinstance(v, Tensor) and v.shape == edit.old.shape else v
                        for k, v in state.items()
                    }
                new_params.append(edit.new)
            group["params"] = new_params


def _rollback(model: nn.Module, edits: list[_Edit], optimizers: Sequence[torch.optim.Optimizer], saved: Any) -> None:
    for edit in reversed(edits):
        if isinstance(edit.old, nn.Parameter):
            setattr(edit.owner, edit.attr, edit.old)
        else:
            edit.owner._buffers[edit.attr] = edit.old
        _set_origin(edit.owner, edit.attr, edit.origin)
    for module in model.modules():
        _sync_attributes(module)
    settle_encoders(model)
    for opt, (groups, state) in zip(optimizers, saved):
        for group, params in zip(opt.param_groups, groups):
            group["params"] = params
        opt.state.clear()
        opt.state.update(state)


def _outputs(model: nn.Module, args: tuple, kwargs: dict) -> list[Tensor]:
    with torch.no_grad():
        out = model(*args, **kwargs)
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, Tensor)]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _compare(before: list[Tensor], after: list[Tensor], rtol: float, atol: float) -> float | None:
    """Max abs difference when ``after`` matches ``before`` within tolerance; None when it does not (or the structure
    or shapes differ)."""
    if len(before) != len(after):
        return None
    worst = 0.0
    for a, b in zip(before, after):
        if a.shape != b.shape:
            return None
        if a.numel():
            diff = (a.float() - b.float()).abs()
            if not bool((diff <= atol + rtol * a.float().abs()).all()):
                return None
            worst = max(worst, float(diff.max()))
    return worst


def remove_dead_channels(
    model: nn.Module,
    example_inputs: Any,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    skip: Iterable[str] = (),
    protect: dict[str, Iterable[int]] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> RemovalReport:
    """Physically remove every 0-bit output channel that can be removed without changing the model's outputs.

    For each quantized layer with dead channels, the dependency group (consumers' input channels, following batch
    norms, residual partners) is collected; the group is removed only if every coupled producer is dead on those
    channels and every coupled module can be sliced. The outputs on ``example_inputs`` (a tensor, a tuple of
    positional arguments, or ``(args, kwargs)``) are checked before and after, in eval mode; if they differ, or
    anything raises, the model and ``optimizers`` are restored exactly. ``protect`` maps layer names to output
    channels that must stay even if dead (e.g. channels a preservation guard may restore).

    Example:
        >>> from lightning_xai.quantization.install import install_quantizers
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> layers = install_quantizers(net)
        >>> with torch.no_grad():
        ...     layers[0].quantizer.b[:2] = 0.0
        >>> remove_dead_channels(net, torch.randn(3, 4)).removed
        {'0': 2}
        >>> net[0].out_features, net[2].in_features
        (4, 4)
    """
    args, kwargs = _normalise_inputs(example_inputs)
    skip = set(skip)
    report = RemovalReport()
    report.params_before = sum(p.numel() for p in model.parameters())
    report.params_after = report.params_before
    layers = [layer for layer in quantized_layers(model) if layer.tensor in ("weight", "in_proj_weight")]
    dead = {layer.name: set(dead_channels(layer)) for layer in layers}
    for name, keep in (protect or {}).items():
        if name in dead:
            dead[name] -= set(int(i) for i in keep)
    candidates = [layer for layer in layers if dead[layer.name] and layer.name not in skip]
    if not candidates:
        return report
    with _eval_mode(model):
        reference = _outputs(model, args, kwargs)
        names = {m: n for n, m in model.named_modules()}
        try:
            with torch.enable_grad(), per_layer_quantization():  # tracing reads the autograd graph
                DG = tp.DependencyGraph().build_dependency(
                    model, example_inputs=_tp_inputs(args, kwargs), output_transform=_tp_outputs, verbose=False
                )
        except Exception as err:  # noqa: BLE001 - tracing arbitrary user models can fail in many ways
            for layer in candidates:
                report.rejected[layer.name] = f"dependency tracing failed: {type(err).__name__}: {err}"
            return report
        silence = _Silence(_zero_outputs(model, layers, dead))  # before idle channels join `dead`: they are not zero
        idle = _idle_channels(layers, DG, names, dead, skip, protect or {})
        for name, extra in idle.items():
            dead[name] |= extra
        candidates = [layer for layer in layers if dead[layer.name] and layer.name not in skip]
        planned: list[tuple[str, list[ChannelCut], int]] = []
        taken: dict[str, set[int]] = defaultdict(set)  # output channels an earlier planned group already removes
        heads: dict[str, int] = {}
        idle_planned: dict[str, int] = {}
        for layer in candidates:
            if isinstance(layer.module, nn.MultiheadAttention):  # whole heads; the residual stream is not touched
                cuts, count, reason = _head_cuts(layer, dead[layer.name])
                if reason is not None:
                    report.rejected[layer.name] = reason
                else:
                    planned.append((layer.name, cuts, count))
                    heads[layer.name] = count // (3 * layer.module.head_dim)
                    idle_planned[layer.name] = len(set(cuts[0].idxs) & idle.get(layer.name, set()))
                continue
            if layer.module not in DG.module2node:
                report.rejected[layer.name] = _unseen_reason(model, layer.name)
                continue
            fn = tp.prune_linear_out_channels if isinstance(layer.module, nn.Linear) else tp.prune_conv_out_channels
            idxs = sorted(dead[layer.name])
            if len(idxs) >= layer.quantizer.b.numel():
                idxs = idxs[:-1]  # keep one channel so shapes stay valid; it outputs zero anyway
                if not idxs:
                    report.rejected[layer.name] = "all channels are dead; one is kept so the graph stays valid"
                    continue
            idxs = [i for i in idxs if i not in taken[layer.name]]
            if not idxs:
                continue  # removed with a group planned for a coupled layer
            group, reason = pruning_group(DG, layer.module, fn, idxs)
            cuts, reason = _group_cuts(group, DG, names, dead, silence) if reason is None else ([], reason)
            if reason is not None and group is not None:
                # some of the channels may still go: those every consumer receives as exact zeros
                quiet = sorted(silence.silent(group, set(idxs), DG))
                if quiet and len(quiet) < len(idxs):
                    group, again = pruning_group(DG, layer.module, fn, quiet)
                    if again is None:
                        cuts, again = _group_cuts(group, DG, names, dead, silence)
                        if again is None:
                            rest = sorted(set(idxs) - set(quiet))
                            report.rejected[layer.name] = f"dead channels {rest[:8]} stayed: {reason}"
                            idxs, reason = quiet, None
            if reason is not None:
                report.rejected[layer.name] = reason
                continue
            for cut in cuts:
                if cut.kind == "out":
                    taken[cut.name].update(cut.idxs)
            planned.append((layer.name, cuts, len(idxs)))
            idle_planned[layer.name] = len(set(idxs) & idle.get(layer.name, set()))
        del DG
        accepted = _try_apply(model, planned, optimizers, args, kwargs, reference, rtol, atol, report)
    for name, count in accepted:
        report.removed[name] = report.removed.get(name, 0) + count
        if name in heads:
            report.heads_removed[name] = heads[name]
        if idle_planned.get(name):
            report.idle[name] = idle_planned[name]
    for name, cuts, _ in planned:
        if name in report.removed:
            report.cuts.extend(cuts)
            for cut in cuts:
                if cut.kind == "out":
                    merged = set(report.removed_idxs.get(cut.name, [])) | set(cut.idxs)
                    report.removed_idxs[cut.name] = sorted(merged)
    report.params_after = sum(p.numel() for p in model.parameters())
    return report


def _idle_channels(
    layers: Sequence[QuantizedLayer],
    DG: Any,
    names: dict[nn.Module, str],
    dead: dict[str, set[int]],
    skip: set[str],
    protect: dict[str, Iterable[int]],
) -> dict[str, set[int]]:
    """Channels that are not at 0 bits but contribute exactly nothing: every layer consuming them is *silent* (all
    its output rows at 0 bits, so it outputs zero whatever its input). A transformer MLP whose second layer died
    entirely has idle hidden units; an attention whose ``out_proj`` died has idle heads. Only groups without other
    coupled producers (a plain hidden layer) qualify; protected channels are left alone."""
    silent = {
        layer.name
        for layer in layers
        if layer.quantizer.b.numel() and len(dead[layer.name]) == layer.quantizer.b.numel()
    }
    found: dict[str, set[int]] = {}
    if not silent:
        return found
    modules = {n: m for m, n in names.items()}
    for layer in layers:
        if layer.name in skip or layer.name in silent:
            continue
        n = layer.quantizer.b.numel()
        kept = set(int(i) for i in protect.get(layer.name, ()))
        if isinstance(layer.module, nn.MultiheadAttention):
            if _join(layer.name, "out_proj") in silent:  # the attention outputs exactly zero: every head is idle
                found[layer.name] = set(range(n)) - dead[layer.name] - kept
            continue
        if layer.module not in DG.module2node or not isinstance(layer.module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        fn = tp.prune_linear_out_channels if isinstance(layer.module, nn.Linear) else tp.prune_conv_out_channels
        group, reason = pruning_group(DG, layer.module, fn, range(n))
        if reason is not None:
            continue
        cuts, reason = _group_cuts(group, DG, names, None)
        if reason is not None:
            continue
        consumers = {c.name for c in cuts if c.kind == "in"}
        others = {c.name for c in cuts if c.kind == "out" and c.name != layer.name}
        if any(not isinstance(modules[o], _BN_TYPES) for o in others):
            continue  # coupled producers (residual partners): not a plain hidden layer
        if consumers and consumers <= silent:
            found[layer.name] = set(range(n)) - dead[layer.name] - kept
    return {k: v for k, v in found.items() if v}


def _head_cuts(layer: QuantizedLayer, dead_rows: set[int]) -> tuple[list[ChannelCut], int, str | None]:
    """Cuts removing the heads of an ``nn.MultiheadAttention`` whose value rows are all dead (their output is exactly
    zero): their query/key/value rows and the matching input columns of ``out_proj``. Returns (cuts, rows, reason)."""
    module = layer.module
    problem = head_removal_problem(module)
    if problem is not None:
        return [], 0, problem
    heads = dead_heads(module, dead_rows)
    if not heads:
        return (
            [],
            0,
            (
                f"{len(dead_rows)} rows are at 0 bits but no head has all its value rows at 0 bits; heads are removed "
                "whole, when their output is exactly zero (single query/key/value rows of a live head cannot go "
                "without changing its scale 1/sqrt(head_dim) or the common head width)"
            ),
        )
    rows = head_rows(module, heads)
    hd = module.head_dim
    columns = tuple(h * hd + j for h in heads for j in range(hd))
    out_proj = _join(layer.name, "out_proj")
    return [ChannelCut(layer.name, "out", tuple(rows)), ChannelCut(out_proj, "in", columns)], len(rows), None


def _try_apply(model, planned, optimizers, args, kwargs, reference, rtol, atol, report):
    """Apply all planned groups at once; if the check fails, fall back to one group at a time."""
    if not planned:
        return []

    def attempt(batch):
        saved = [([list(g["params"]) for g in opt.param_groups], dict(opt.state)) for opt in optimizers]
        edits: list[_Edit] = []
        try:
            apply_cuts(model, [c for _, cuts, _ in batch for c in cuts], optimizers, edits)
            diff = _compare(reference, _outputs(model, args, kwargs), rtol, atol)
        except BaseException:
            _rollback(model, edits, optimizers, saved)
            raise
        if diff is None:
            _rollback(model, edits, optimizers, saved)
            return False
        report.max_abs_diff = max(report.max_abs_diff, diff)
        return True

    if attempt(planned):
        return [(name, n) for name, _, n in planned]
    accepted = []
    done: dict[tuple[str, str], list[int]] = defaultdict(list)  # indices (as planned) already removed, per dimension
    for name, cuts, count in planned:
        # the groups were planned on the model as it was: renumber each cut past the channels accepted before it
        # (two groups can slice the same layer, e.g. partners of a residual stream on different channels)
        now = [_renumber(cut, done[(cut.name, cut.kind)]) for cut in cuts]
        if attempt([(name, [cut for cut in now if cut.idxs], count)]):
            accepted.append((name, count))
            for cut in cuts:
                done[(cut.name, cut.kind)] = sorted(set(done[(cut.name, cut.kind)]) | set(cut.idxs))
        else:
            report.rejected[name] = "removing its dead channels would change the model's outputs"
    return accepted


def _renumber(cut: ChannelCut, removed: list[int]) -> ChannelCut:
    """``cut`` (indices as planned) in the numbering left after the sorted planned indices ``removed`` are gone."""
    if not removed:
        return cut
    gone = set(removed)
    idxs = tuple(i - bisect.bisect_left(removed, i) for i in cut.idxs if i not in gone)
    return ChannelCut(cut.name, cut.kind, idxs)


def execution_order(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Module name -> position of its first call in one eval-mode, no-grad forward of ``example_inputs`` (modules
    the forward does not call are absent)."""
    args, kwargs = _normalise_inputs(example_inputs)
    order: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():

        def hook(mod: nn.Module, inputs: Any, name: str = name) -> None:
            order.setdefault(name, len(order))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), _eval_mode(model):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order


def _normalise_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple)
        and isinstance(example_inputs[1], dict)
    ):
        return example_inputs[0], example_inputs[1]
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise TypeError(
        "`example_inputs` must be a tensor, a tuple of positional arguments, a dict of keyword arguments or "
        f"(args, kwargs), got {type(example_inputs).__name__}"
    )


def _tp_outputs(out: Any) -> Any:
    """torch-pruning's ``output_transform``: every tensor a model returns becomes its own graph output.

    torch-pruning marks as a model output only the last operation of each returned tensor that it has not already
    met while tracing another one. A model that returns an intermediate tensor next to its logits (``{"logits": …,
    "features": flatten(x)}``, a tuple with a hidden state) had that tensor's channels taken for ordinary inner
    channels (met first on the logits' path), so C-SWAP pruned them and the returned features changed width (the
    check after the removal then restored the model, at fit end). A copy of each returned tensor gives every one an
    operation of its own, which torch-pruning marks as an output. A single tensor is left as it is. Objects with
    attributes (``SimpleNamespace``, dataclasses), which torch-pruning cannot flatten, are read through ``vars``.
    """
    tensors: list[Tensor] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, Tensor):
            tensors.append(obj)
        elif isinstance(obj, Mapping):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)
        elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
            for value in vars(obj).values():
                walk(value)

    walk(out)
    traced = [t for t in tensors if t.grad_fn is not None]
    if len(tensors) == 1:
        return out if isinstance(out, Tensor) else tensors[0]
    return [t.clone() for t in traced]


def _tp_inputs(args: tuple, kwargs: dict) -> Any:
    if kwargs and not args:
        return kwargs
    if kwargs:
        raise TypeError("dependency tracing needs positional or keyword example inputs, not both")
    return args[0] if len(args) == 1 else list(args)
