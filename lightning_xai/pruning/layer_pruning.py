"""Whole-layer pruning from layer scores: the bottom ``p`` % of layers, zeroed (the paper) or bypassed.

* ``zero``: weights and bias of the layer set to zero, the graph unchanged (arXiv "Explainability-inspired
  layer-wise pruning", sec. 3.3). Parameters and FLOPs stay; latency barely moves.
* ``bypass``: the layer (and a batch norm reading only its output) is replaced by ``nn.Identity`` — only where
  its output has the shape of its input (same-shape convolutions inside residual branches, depthwise 3×3 stride-1
  layers, square Linear layers). The computation really disappears.

Both are transactions: on an exception, or if the model's output structure or shapes change, the model is
restored exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_xai.attribution.layers import DEFAULT_TYPES
from lightning_xai.pruning.surgery import _eval_mode, _normalise_inputs, execution_order
from lightning_xai.quantization.install import BN_TYPES

__all__ = [
    "MODES",
    "layer_order",
    "default_candidates",
    "bypassable_layers",
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
                    module = modules[name]
                    tensors = {k: v for k, v in (("weight", module.weight), ("bias", module.bias)) if v is not None}
                    record.saved[name] = {k: v.detach().clone() for k, v in tensors.items()}
                    for v in tensors.values():
                        v.zero_()
        else:
            able = bypassable_layers(model, example_inputs, list(layers))
            refused = [n for n in layers if n not in able]
            if refused:
                raise ValueError(f"cannot bypass {refused}: their output shape differs from their input's")
            for name in layers:
                for member in able[name]:
                    if member not in record.replaced:
                        record.replaced[member] = modules[member]
                        _set_module(model, member, nn.Identity())
        after = _signature(_run(model, example_inputs))
        if after != before:
            raise RuntimeError(
                f"layer pruning changed the output structure {before} -> {after}; the model was restored"
            )
    except BaseException:
        undo_layer_pruning(model, record)
        raise
    return record


def undo_layer_pruning(model: nn.Module, record: LayerPruning) -> None:
    """Put back what :func:`prune_layers` changed."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, tensors in record.saved.items():
            for k, v in tensors.items():
                getattr(modules[name], k).copy_(v)
    for name, module in record.replaced.items():
        _set_module(model, name, module)
    record.saved.clear()
    record.replaced.clear()
