"""Callbacks on a compiled model: ``trainer.fit(torch.compile(model))`` (Lightning unwraps it and compiles the
LightningModule's ``forward`` and ``*_step`` methods, ``from_compiled``) or a submodule the user compiled
(``self.net = torch.compile(net)``).

The callbacks' own forwards of such a model (removal checks, torch-pruning's graph tracing, the preservation pass,
the fit-end analyses) went through the compiled code too, under other grad modes, batch sizes and hooks, so each one
recompiled it (dynamo's limit of 8 was reached within a few removals, after which the user's own step ran eagerly),
and torch-pruning's tracing broke the graph. :func:`eager_hooks` runs every hook of a callback with the compiler set
to eager when (and only when) the model is a compiled one; the user's training step stays compiled.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["eager_hooks", "is_compiled"]

T = TypeVar("T", bound=type)


_HOLDS_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_compiled(module: Any) -> bool:
    """Whether ``module`` is a LightningModule that Lightning compiled (it unwraps ``torch.compile(model)``) or holds
    a compiled submodule (``self.net = torch.compile(net)``; looked up once per module)."""
    if getattr(module, "_compiler_ctx", None) is not None:
        return True
    if not isinstance(module, nn.Module):
        return False
    held = _HOLDS_COMPILED.get(module)
    if held is None:
        held = any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in module.modules())
        _HOLDS_COMPILED[module] = held
    return held


def eager_hooks(cls: T) -> T:
    """Class decorator: each ``setup``/``teardown``/``on_*`` hook that ``cls`` defines runs with
    ``torch.compiler.set_stance("force_eager")`` when its LightningModule (the hooks' second argument) is compiled.
    Entering the stance costs ≈ 0.14 ms, so hooks of plain models skip it."""
    for name, fn in list(vars(cls).items()):
        if callable(fn) and (name.startswith("on_") or name in ("setup", "teardown")):
            setattr(cls, name, _eager(fn))
    return cls


def _eager(fn: Any) -> Any:
    @functools.wraps(fn)
    def hook(self: Any, trainer: Any = None, pl_module: Any = None, *args: Any, **kwargs: Any) -> Any:
        if is_compiled(pl_module):
            with torch.compiler.set_stance("force_eager"):
                return fn(self, trainer, pl_module, *args, **kwargs)
        return fn(self, trainer, pl_module, *args, **kwargs)

    return hook
