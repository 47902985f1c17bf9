"""Layer importance scores (arXiv "Explainability-inspired layer-wise pruning", eqs. 1 and 2) behind one protocol.

Every scorer has ``score(model, batches) -> {layer name: score}`` and never changes the model: parameters, buffers
(batch-norm statistics even when the loss needs train mode), ``.grad``, train/eval modes and hooks are as before,
also when the loss raises.

* :class:`GradientActivationScorer`: ``S_l = E_x[Σ_i |∂L/∂A_l,i · A_l,i|]`` — activations ``A_l`` captured by
  forward hooks, their gradients by ``torch.autograd.grad`` (the same quantity the paper's backward hooks read,
  without writing ``.grad``). The expectation is over samples: per-sample losses are summed (``reduction="sum"``),
  so batches of any size accumulate to the score of the concatenated data.
* :class:`TaylorScorer`: ``E_x[|Σ_i ∂L/∂A_l,i · A_l,i|]``, the first-order estimate of the loss change when the
  layer's output is removed.
* :class:`L1Scorer`: ``S_l = Σ_i |W_l,i|`` (eq. 1), data-free.

The loss is pluggable: ``loss_fn(model, batch) -> (summed loss, number of samples)``. :func:`classification_loss`
is the default; :func:`detection_loss` serves torchvision detectors, which return a loss dict in train mode.
Under DDP, the summed scores and sample counts are all-reduced, so every rank ranks the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.evaluation import class_scores, model_device
from lightning_xai.preservation.scores import model_state_guard

__all__ = [
    "LayerScorer",
    "GradientActivationScorer",
    "TaylorScorer",
    "L1Scorer",
    "classification_loss",
    "detection_loss",
    "prunable_layers",
    "untouched",
]

LossFn = Callable[[nn.Module, Any], tuple[Tensor, int]]
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class LayerScorer(Protocol):
    """Scores every prunable layer; higher means more important."""

    name: str

    def score(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]: ...


def prunable_layers(model: nn.Module, types: Sequence[type[nn.Module]] = DEFAULT_TYPES) -> list[str]:
    """Names of the layers of ``types`` (Conv/Linear by default), in definition order."""
    return [n for n, m in model.named_modules() if isinstance(m, tuple(types)) and n]


def classification_loss(model: nn.Module, batch: Any) -> tuple[Tensor, int]:
    """Summed cross-entropy of ``batch = (x, y, ...)`` in eval mode."""
    x, y = batch[0], batch[1]
    model.eval()
    return F.cross_entropy(class_scores(model(x)), y, reduction="sum"), int(y.shape[0])


def detection_loss(model: nn.Module, batch: Any) -> tuple[Tensor, int]:
    """Sum of a torchvision detector's losses for ``batch = (images, targets)`` (train mode, which is where
    detectors return losses; batch norms are restored afterwards by the scorer). Detector losses are batch means,
    so the sum is scaled by the number of images to accumulate like per-sample sums."""
    images, targets = batch
    model.train()
    losses = model(list(images), list(targets))
    n = len(images)
    return sum(losses.values()) * n, n


def untouched(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Restore modes, buffers (e.g. batch-norm statistics) and ``.grad`` of ``model`` on exit, even after errors."""
    return model_state_guard(model, buffers=True)


def _all_reduce(values: Tensor) -> Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


class _ActivationScorer:
    name = "activation"

    def __init__(
        self,
        loss_fn: LossFn = classification_loss,
        num_batches: int | None = None,
        types: Sequence[type[nn.Module]] = DEFAULT_TYPES,
        layers: Sequence[str] | None = None,
    ) -> None:
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"`num_batches` must be a positive integer or None, got {num_batches!r}")
        self.loss_fn = loss_fn
        self.num_batches = num_batches
        self.types = tuple(types)
        self.layers = None if layers is None else list(layers)

    def _reduce(self, grad: Tensor, act: Tensor) -> Tensor:  # per call: (summed over the batch) score
        raise NotImplementedError

    def score(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        names = self.layers if self.layers is not None else prunable_layers(model, self.types)
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"`layers` names modules that `model` does not have: {missing[:5]}")
        device = model_device(model)  # totals live with the model: NCCL reduces device tensors only
        totals = torch.zeros(len(names), dtype=torch.float64, device=device)
        samples = 0
        captured: list[tuple[int, Tensor]] = []
        handles = []

        def hook_for(i: int):
            def hook(module: nn.Module, args: tuple, output: Any) -> Any:
                if isinstance(output, Tensor) and output.requires_grad:
                    captured.append((i, output))
                    return output.clone()  # later in-place ops (ReLU(inplace=True)) must not alter what we keep
                return None

            return hook

        with untouched(model):
            try:
                for i, name in enumerate(names):
                    handles.append(modules[name].register_forward_hook(hook_for(i)))
                for b, batch in enumerate(batches):
                    if self.num_batches is not None and b >= self.num_batches:
                        break
                    captured.clear()
                    with torch.enable_grad():
                        loss, n = self.loss_fn(model, batch)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"the loss of batch {b} is not finite ({float(loss)})")
                        grads = torch.autograd.grad(loss, [t for _, t in captured], allow_unused=True)
                    for (i, act), grad in zip(captured, grads):
                        if grad is not None:
                            totals[i] += self._reduce(grad.detach().double(), act.detach().double())
                    samples += n
                    captured.clear()
            finally:
                for h in handles:
                    h.remove()
                captured.clear()
        count = torch.tensor([float(samples)], dtype=torch.float64, device=device)
        reduced = _all_reduce(torch.cat([totals, count])).cpu()  # one host transfer, after the reduction
        if reduced[-1] <= 0:
            raise ValueError("`batches` yielded no samples to score")
        values = reduced[:-1] / reduced[-1]
        return {name: float(v) for name, v in zip(names, values)}


class GradientActivationScorer(_ActivationScorer):
    """``S_l = E_x[Σ_i |∂L/∂A_l,i · A_l,i|]`` (the paper's eq. 2).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> batch = (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
        >>> sorted(GradientActivationScorer().score(net, [batch]))
        ['0', '2']
    """

    name = "gradxact"

    def _reduce(self, grad: Tensor, act: Tensor) -> Tensor:
        return (grad * act).abs().sum()


class TaylorScorer(_ActivationScorer):
    """``E_x[|Σ_i ∂L/∂A_l,i · A_l,i|]``: first-order loss change when the layer's output is removed."""

    name = "taylor"

    def _reduce(self, grad: Tensor, act: Tensor) -> Tensor:
        return (grad * act).flatten(1).sum(1).abs().sum()


class L1Scorer:
    """``S_l = Σ_i |W_l,i|`` (the paper's eq. 1); ``batches`` is ignored."""

    name = "l1"

    def __init__(self, types: Sequence[type[nn.Module]] = DEFAULT_TYPES, layers: Sequence[str] | None = None) -> None:
        self.types = tuple(types)
        self.layers = None if layers is None else list(layers)

    def score(self, model: nn.Module, batches: Iterable[Any] = ()) -> dict[str, float]:
        names = self.layers if self.layers is not None else prunable_layers(model, self.types)
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"`layers` names modules that `model` does not have: {missing[:5]}")
        out = {}
        for name in names:
            w = getattr(modules[name], "weight", None)
            if not isinstance(w, Tensor):
                raise ValueError(f"layer {name!r} ({type(modules[name]).__name__}) has no weight to score")
            out[name] = float(w.detach().double().abs().sum())
        return out
