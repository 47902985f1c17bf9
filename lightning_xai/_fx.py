"""torch.fx tracing shared by LRP and C-SWAP's fast engine."""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = ["symbolic_trace"]


class _Tracer(torch.fx.Tracer):
    """torch.fx's default tracer, with every ``nn.MultiheadAttention`` a leaf — also the library's own subclass for
    attentions that lost heads (torch.fx keeps only classes defined under ``torch.nn`` as leaves)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.MultiheadAttention) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with attention modules as leaves, and ``forward``'s further arguments
    fixed at their defaults (the analyses call the model with its input alone).

    Traced as proxies, those arguments took the wrong branch of ``if mask is not None:`` (the graph then called
    ``linear(None)``) and made ``if return_features:`` untraceable; fixed at their defaults, each such branch is the
    one the model runs. The checks torch.fx adds for the fixed values, and their placeholders, are removed: the
    graph module takes the input alone."""
    tracer = _Tracer()
    fixed = _further_defaults(model)
    graph = tracer.trace(model, concrete_args=fixed or None)
    if fixed:
        _drop_fixed_arguments(graph)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


def _further_defaults(model: nn.Module) -> dict[str, Any]:
    """``{name: default}`` of the arguments of ``model.forward`` after the first that have a default."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin): trace as torch.fx does
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}


_CHECKS = (torch.fx._symbolic_trace._assert_is_none, torch._assert, operator.eq)


def _drop_fixed_arguments(graph: torch.fx.Graph) -> None:
    """Remove the placeholders of the fixed arguments and the checks torch.fx hung on them (nothing else uses them:
    the traced code saw constants)."""
    fixed = [n for n in graph.nodes if n.op == "placeholder" and n.args]  # placeholders with a default
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    fixed = [n for n in fixed if n is not first]
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in _CHECKS and not node.users:
            inputs = node.all_input_nodes
            if inputs and all(i in fixed or (i.op == "call_function" and i.target in _CHECKS) for i in inputs):
                graph.erase_node(node)
    for node in fixed:
        if not node.users:
            graph.erase_node(node)
    graph.lint()
