"""Whole-layer pruning from layer scores: the bottom ``p`` % of layers, zeroed (the paper) or bypassed.

* ``zero``: weights and bias of the layer set to zero, the graph unchanged (arXiv "Explainability-inspired
  layer-wise pruning", sec. 3.3). Parameters and FLOPs stay; latency barely moves.
* ``bypass``: the layer (and a batch norm reading only its output) is replaced by ``nn.Identity`` where its
  output has the shape of its input (same-shape convolutions inside residual branches, depthwise 3×3 stride-1
  layers, square Linear layers). A layer that *ends a residual branch* — its output reaches an addition
  ``x + f(x)`` only through scalings, dropout and reshapes, and the branch input derives from ``x`` (a transformer's
  MLP sublayer, ConvNeXt's block) — takes the whole branch with it: the largest module around it whose output is
  still that branch (torchvision's ``MLPBlock``, ConvNeXt's ``block``) is replaced by :class:`ZeroBranch`, so
  ``x + f(x)`` becomes ``x``. The computation really disappears.

Both are transactions: on an exception, or if the model's output structure or shapes change, the model is
restored exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_xai.attribution.layers import DEFAULT_TYPES
from lightning_xai.pruning.surgery import _eval_mode, _get, _normalise_inputs, execution_order
from lightning_xai.quantization.install import BN_TYPES

__all__ = [
    "MODES",
    "layer_order",
    "default_candidates",
    "bypassable_layers",
    "residual_branch_ends",
    "ZeroBranch",
    "select_bottom",
    "LayerPruning",
    "prune_layers",
    "undo_layer_pruning",
]

MODES = ("zero", "bypass")
_BN = BN_TYPES


def _run(model: nn.Module, example_inputs: Any) -> Any:
    args, kwargs = _normalise_inputs(example_inputs)
    with torch.no_grad(), _eval_mode(model):
        return model(*args, **kwargs)


def layer_order(model: nn.Module, example_inputs: Any, types: Sequence[type[nn.Module]] = DEFAULT_TYPES) -> list[str]:
    """Layers of ``types`` in the order the forward pass first calls them (unused layers are left out)."""
    modules = dict(model.named_modules())
    order = execution_order(model, example_inputs)
    return [n for n in sorted(order, key=order.get) if n and isinstance(modules[n], tuple(types))]


def default_candidates(
    model: nn.Module,
    example_inputs: Any,
    types: Sequence[type[nn.Module]] = DEFAULT_TYPES,
    include_first_last: bool = False,
) -> list[str]:
    """Prunable layers: every layer of ``types`` used by the forward pass, without the first and the last unless
    ``include_first_last``."""
    order = layer_order(model, example_inputs, types)
    return order if include_first_last else order[1:-1]


def bypassable_layers(model: nn.Module, example_inputs: Any, names: Sequence[str]) -> dict[str, list[str]]:
    """``{layer: [layer, following batch norm...]}`` for the layers of ``names`` that can become identities: called
    once, one tensor input, output shape equal to the input shape. A batch norm whose input *is* the layer's output
    tensor goes with it (it was calibrated for that output)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[tuple[tuple, tuple, int, int]]] = {n: [] for n in names}
    outputs: dict[int, str] = {}
    followers: dict[str, list[str]] = {n: [] for n in names}
    handles = []
    for name in names:

        def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            tensors = [a for a in args if isinstance(a, Tensor)]
            if len(tensors) == 1 and len(args) == 1 and isinstance(out, Tensor):
                seen[name].append((tuple(tensors[0].shape), tuple(out.shape), id(out), 0))
                outputs[id(out)] = name
            else:
                seen[name].append(((), (None,), 0, 0))

        handles.append(modules[name].register_forward_hook(hook))
    for bn_name, bn in modules.items():
        if isinstance(bn, _BN):

            def bn_hook(mod: nn.Module, args: tuple, bn_name: str = bn_name) -> None:
                producer = outputs.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
                if producer is not None:
                    followers[producer].append(bn_name)

            handles.append(bn.register_forward_pre_hook(bn_hook))
    try:
        _run(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name in names:
        calls = seen[name]
        if len(calls) == 1 and calls[0][0] == calls[0][1]:
            result[name] = [name] + followers[name][:1]
    return result


class ZeroBranch(nn.Module):
    """Stands for a bypassed residual branch: zeros shaped like the branch output (the input's shape with the
    dimensions that differed at analysis time set to the branch output's; a tuple ``(zeros, None)`` for branches that
    returned one, like ``nn.MultiheadAttention``)."""

    def __init__(self, sizes: dict[int, int], tuple_output: bool = False) -> None:
        super().__init__()
        self.sizes = dict(sizes)
        self.tuple_output = tuple_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor))
        shape = list(x.shape)
        for dim, size in self.sizes.items():
            shape[dim] = size
        zeros = x.new_zeros(shape)
        return (zeros, None) if self.tuple_output else zeros

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


# autograd nodes a branch output may pass through on its way to the residual addition: one tensor in, the same
# values out up to a constant or learned scale (layer scale), dropout, or a reshape
_CARRY = {
    "MulBackward0",
    "DivBackward0",
    "NativeDropoutBackward0",
    "CloneBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "PermuteBackward0",
    "TransposeBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "UnsqueezeBackward0",
}
_ADDS = {"AddBackward0"}


def _inputs_of(fn: Any) -> list[Any]:
    return [f for f, _ in getattr(fn, "next_functions", ()) if f is not None]


def _carried(fn: Any) -> Any:
    """The node ``fn`` carries its value from, when it is a carrying node with exactly one computed input."""
    if fn is None or type(fn).__name__ not in _CARRY:
        return None
    computed = [f for f in _inputs_of(fn) if type(f).__name__ != "AccumulateGrad"]
    return computed[0] if len(computed) == 1 else None


def _reaches(start: Any, goal: Any, limit: int = 20000) -> bool:
    """Whether ``goal`` is ``start`` or one of its ancestors in the autograd graph."""
    seen: set[int] = set()
    stack = [start]
    while stack and len(seen) < limit:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        if fn is goal:
            return True
        seen.add(id(fn))
        stack.extend(_inputs_of(fn))
    return False


def _first_tensor(value: Any) -> Tensor | None:
    leaves, _ = tree_flatten(value)
    return next((t for t in leaves if isinstance(t, Tensor)), None)


class _Emptied(nn.Linear):
    """A Linear layer with no hidden units left on one side (``in_features`` or ``out_features`` is 0): it costs
    nothing and outputs its bias (zero here)."""


def _emptied(layer: nn.Linear, side: str) -> nn.Linear:
    shape = (0, layer.in_features) if side == "out" else (layer.out_features, 0)
    with warnings.catch_warnings():  # "initializing zero-element tensors is a no-op": intended
        warnings.simplefilter("ignore", UserWarning)
        new = _Emptied(
            shape[1], shape[0], bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype
        )
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


# elementwise steps between the two Linear layers of an MLP sublayer (activations with f(0) = 0, dropout)
_HIDDEN_STEPS = {"ReluBackward0", "GeluBackward0", "SiluBackward0", "NativeDropoutBackward0", "CloneBackward0"}


def _mlp_start(end_input: Any, out_fn: Mapping[str, Any], modules: Mapping[str, nn.Module]) -> str | None:
    """The Linear layer whose output feeds ``end_input`` through activations/dropout only (an MLP's first layer)."""
    node = end_input
    by_fn = {id(fn): name for name, fn in out_fn.items() if isinstance(modules[name], nn.Linear)}
    while node is not None:
        if id(node) in by_fn:
            return by_fn[id(node)]
        if type(node).__name__ not in _HIDDEN_STEPS:
            return None
        computed = [f for f in _inputs_of(node) if type(f).__name__ != "AccumulateGrad"]
        node = computed[0] if len(computed) == 1 else None
    return None


def residual_branch_ends(
    model: nn.Module, example_inputs: Any, names: Sequence[str]
) -> dict[str, list[tuple[str, nn.Module]]]:
    """``{layer: [(module, replacement), ...]}`` for the layers of ``names`` that end a residual branch (see the
    module docstring): the branch output reaches an addition ``x + f(x)`` through carrying nodes only, and the branch
    input derives from ``x``. The branch module becomes a :class:`ZeroBranch`; when the layer itself is the branch
    (``nn.TransformerEncoderLayer``'s ``linear2``, whose parent reads the weights of its layers directly), the MLP
    loses all its hidden units instead (``linear1`` with no outputs, ``linear2`` with no inputs and a zero bias).
    Read from the autograd graph of one forward pass (eval mode, gradients on, nothing kept afterwards)."""
    modules = dict(model.named_modules())
    out_fn: dict[str, Any] = {}
    in_fn: dict[str, Any] = {}
    shapes: dict[str, tuple[tuple, tuple, bool]] = {}
    handles = []
    for name, module in modules.items():
        if not name:
            continue

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any, name: str = name) -> None:
            first_in, first_out = _first_tensor((args, kwargs)), _first_tensor(out)
            if first_in is None or first_out is None or name in out_fn:
                return
            out_fn[name], in_fn[name] = first_out.grad_fn, first_in.grad_fn
            shapes[name] = (tuple(first_in.shape), tuple(first_out.shape), isinstance(out, tuple))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    args, kwargs = _normalise_inputs(example_inputs)
    try:
        with torch.enable_grad(), _eval_mode(model):
            output = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    # every addition of the graph, and the chain of carrying nodes leading into each of its operands
    branch_of: dict[int, tuple[Any, Any]] = {}  # node id -> (addition, the other operand)
    seen: set[int] = set()
    stack = [t.grad_fn for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        ins = _inputs_of(fn)
        stack.extend(ins)
        if type(fn).__name__ in _ADDS and len(ins) == 2:
            for side, other in ((ins[0], ins[1]), (ins[1], ins[0])):
                node = side
                while node is not None:
                    branch_of.setdefault(id(node), (fn, other))
                    node = _carried(node)
    result: dict[str, list[tuple[str, nn.Module]]] = {}
    for name in names:
        end = out_fn.get(name)
        if end is None or id(end) not in branch_of:
            continue
        add, residual = branch_of[id(end)]
        # the largest module around the layer whose output is still this branch, taking its input from x
        best = None
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            owner = ".".join(parts[:cut])
            fn = out_fn.get(owner)
            if fn is None or branch_of.get(id(fn), (None,))[0] is not add:
                continue
            node, carried_from_layer = fn, False
            while node is not None:  # the owner's output is the layer's output, carried
                if node is end:
                    carried_from_layer = True
                    break
                node = _carried(node)
            if carried_from_layer and in_fn.get(owner) is not None and _reaches(in_fn[owner], residual):
                best = owner
        if best is None:
            continue
        layer = modules[best]
        if best == name and isinstance(layer, nn.Linear):
            start = _mlp_start(in_fn.get(name), out_fn, modules)
            if start is None:
                continue
            result[name] = [(start, _emptied(modules[start], "out")), (name, _emptied(layer, "in"))]
            continue
        shape_in, shape_out, is_tuple = shapes[best]
        if len(shape_in) != len(shape_out):
            continue
        sizes = {d: o for d, (i, o) in enumerate(zip(shape_in, shape_out)) if d > 0 and i != o}
        result[name] = [(best, ZeroBranch(sizes, is_tuple))]
    return result


def select_bottom(scores: Mapping[str, float], fraction: float, candidates: Sequence[str]) -> list[str]:
    """The ``max(1, round(fraction · len(candidates)))`` lowest-scoring candidates (ties by name).

    Example:
        >>> select_bottom({"a": 3.0, "b": 1.0, "c": 2.0}, 0.05, ["a", "b", "c"])
        ['b']
    """
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction!r}")
    if not candidates:
        raise ValueError("no candidate layers to prune (after excluding the first and the last layer)")
    missing = [c for c in candidates if c not in scores]
    if missing:
        raise ValueError(f"no score for candidate layers {missing[:5]}")
    count = max(1, int(fraction * len(candidates) + 0.5))
    return sorted(candidates, key=lambda n: (scores[n], n))[:count]


@dataclass
class LayerPruning:
    """What :func:`prune_layers` did, with what is needed to undo it."""

    mode: str
    layers: list[str]
    replaced: dict[str, nn.Module] = field(default_factory=dict, repr=False)  # bypass: name -> original module
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)  # zero: name -> tensors

    @property
    def removed_modules(self) -> list[str]:
        return sorted(self.replaced)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _signature(out: Any) -> list[tuple]:
    leaves, spec = tree_flatten(out)
    return [str(spec)] + [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in leaves]


def prune_layers(model: nn.Module, layers: Sequence[str], mode: str, example_inputs: Any) -> LayerPruning:
    """Zero or bypass ``layers`` of ``model`` in place; see the module docstring. Returns the undo record."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    modules = dict(model.named_modules())
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ValueError(f"`layers` names modules that `model` does not have: {unknown[:5]}")
    before = _signature(_run(model, example_inputs))
    record = LayerPruning(mode, list(layers))
    try:
        if mode == "zero":
            with torch.no_grad():
                for name in layers:
                    tensors = _stored_tensors(modules[name])
                    record.saved[name] = {k: v.detach().clone() for k, v in tensors.items()}
                    for v in tensors.values():
                        v.zero_()
        else:
            able = bypassable_layers(model, example_inputs, list(layers))
            ends = residual_branch_ends(model, example_inputs, [n for n in layers if n not in able])
            refused = [n for n in layers if n not in able and n not in ends]
            if refused:
                raise ValueError(
                    f"cannot bypass {refused}: their output shape differs from their input's and they do not end a "
                    "residual branch"
                )
            replacements = {m: nn.Identity() for n in able if n in layers for m in able[n]}
            replacements |= {member: new for pairs in ends.values() for member, new in pairs}
            for member, replacement in replacements.items():
                if member not in record.replaced:
                    record.replaced[member] = modules[member]
                    _set_module(model, member, replacement)
        after = _signature(_run(model, example_inputs))
        if after != before:
            raise RuntimeError(
                f"layer pruning changed the output structure {before} -> {after}; the model was restored"
            )
    except BaseException:
        undo_layer_pruning(model, record)
        raise
    return record


def _stored_tensors(module: nn.Module) -> dict[str, Tensor]:
    """A layer's ``weight``/``bias`` as stored (surgery's ``_get``: the latent ``original`` of a parametrized one, which
    SelfCompression's quantizer and bias gate map from zero to exactly zero; writing into the computed tensor would
    change a temporary and nothing else)."""
    return {name: t for name in ("weight", "bias") if isinstance(t := _get(module, name), Tensor)}


def undo_layer_pruning(model: nn.Module, record: LayerPruning) -> None:
    """Put back what :func:`prune_layers` changed."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, tensors in record.saved.items():
            stored = _stored_tensors(modules[name])
            for k, v in tensors.items():
                stored[k].copy_(v)
    for name, module in record.replaced.items():
        _set_module(model, name, module)
    record.saved.clear()
    record.replaced.clear()
