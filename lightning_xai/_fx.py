"""torch.fx tracing shared by LRP and C-SWAP's fast engine."""

from __future__ import annotations

import torch.fx
from torch import nn

__all__ = ["symbolic_trace"]


class _Tracer(torch.fx.Tracer):
    """torch.fx's default tracer, with every ``nn.MultiheadAttention`` a leaf — also the library's own subclass for
    attentions that lost heads (torch.fx keeps only classes defined under ``torch.nn`` as leaves)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.MultiheadAttention) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with attention modules as leaves."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)
