"""C-SWAP's causal criterion (arXiv C-SWAP, sec. 3.2, definitions 1 and 2).

For a neuron ``n`` (a Conv output channel or Linear output feature) its outgoing connections are cut, the scoring
function ``σ`` (default: the true-class probability) is recomputed on the analysis samples, and

* the global causal effect is ``ξ_n = mean_x (σ*_n(x) − σ(x)) / σ(x)`` (definition 1);
* per class ``k`` a paired t-test between ``σ(x)`` and ``σ*_n(x)`` over the samples of class ``k`` gives
  ``π_n^(k) = p < α``;
* the neuron is *neutral* if no ``π_n^(k)`` holds, *critical* if one holds and ``ξ_n < 0`` (cutting it hurts), and
  *detrimental* if one holds and ``ξ_n > 0`` (definition 2). A neuron whose cut changes nothing (all differences zero,
  the t statistic is undefined) is neutral.

This module holds the pure statistics and a slow, obviously-correct reference scorer (one intervention per forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from lightning_xai._validation import validate_number
from lightning_xai.evaluation import class_scores

__all__ = [
    "CRITICAL",
    "NEUTRAL",
    "DETRIMENTAL",
    "CATEGORY_NAMES",
    "paired_t_test",
    "global_causal_effect",
    "classify_neurons",
    "NeuronVerdicts",
    "true_class_probability",
    "cut_channels",
    "reference_causal_scores",
]

CRITICAL, NEUTRAL, DETRIMENTAL = 0, 1, 2
CATEGORY_NAMES = ("critical", "neutral", "detrimental")


def paired_t_test(before: Tensor, after: Tensor) -> tuple[Tensor, Tensor]:
    """Two-sided paired t-test along the last dimension, vectorised over leading dimensions.

    Returns ``(t, p)`` like ``scipy.stats.ttest_rel(after, before, axis=-1)``; where every difference is zero the
    statistic is undefined and ``p`` is 1 (no evidence of an effect).
    """
    d = (after - before).double()
    n = d.shape[-1]
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs per group, got {n}")
    mean = d.mean(-1)
    sd = d.std(-1, unbiased=True)
    t = mean / (sd / np.sqrt(n))
    p = torch.from_numpy(2.0 * stats.t.sf(np.abs(t.cpu().numpy()), df=n - 1)).to(t.device)  # scipy: host
    undefined = sd == 0
    p = torch.where(undefined & (mean == 0), torch.ones_like(p), p)
    p = torch.where(undefined & (mean != 0), torch.zeros_like(p), p)  # a constant non-zero shift is certain
    return t, p


def _per_class_paired_p(d: Tensor, labels: Tensor, classes: list[int]) -> Tensor:
    """p-values of :func:`paired_t_test` for every row of ``d`` (N, M) and every class, in one vectorised pass
    (two-pass variance, so a large constant shift with tiny noise is not lost to cancellation)."""
    onehot = (labels[:, None] == torch.tensor(classes, device=labels.device)[None, :]).to(d.dtype)  # (M, C)
    n = onehot.sum(0)  # (C,)
    mean = (d @ onehot) / n  # (N, C)
    centred = d - mean @ onehot.T  # each sample minus its class mean
    sd = ((centred**2) @ onehot / (n - 1)).sqrt()
    t = mean / (sd / n.sqrt())
    df = (n - 1).cpu().numpy()[None, :]
    p = torch.from_numpy(2.0 * stats.t.sf(np.abs(t.cpu().numpy()), df=df)).to(t.device)  # scipy: one host transfer
    undefined = sd == 0
    p = torch.where(undefined & (mean == 0), torch.ones_like(p), p)
    return torch.where(undefined & (mean != 0), torch.zeros_like(p), p)


def global_causal_effect(sigma: Tensor, sigma_star: Tensor) -> Tensor:
    """``ξ = mean((σ* − σ)/σ)`` over the last dimension (definition 1)."""
    return ((sigma_star.double() - sigma.double()) / sigma.double()).mean(-1)


@dataclass
class NeuronVerdicts:
    """Per neuron: category (0 critical, 1 neutral, 2 detrimental), ``ξ``, and per-class significance."""

    category: Tensor  # (N,) int64
    xi: Tensor  # (N,) float64
    significant: Tensor  # (N, C) bool
    p_values: Tensor  # (N, C) float64
    classes: list[int]


def classify_neurons(
    sigma: Tensor, sigma_star: Tensor, labels: Tensor, alpha: float = 0.05, rtol: float = 1e-5
) -> NeuronVerdicts:
    """Definition 2 for ``N`` neurons: ``sigma`` ``(M,)`` unperturbed scores, ``sigma_star`` ``(N, M)`` with each
    neuron cut, ``labels`` ``(M,)``. Classes with fewer than two samples are skipped (they cannot be tested).
    ``sigma`` may also be ``(N, M)``: one "before" row per neuron (C-SWAP's chains of cumulative cuts, where neuron
    ``j`` is judged on the network with the neurons before it already removed).

    Per-sample changes within ``rtol`` of ``σ`` count as no change: float32 rounding (a different batch size or
    summation order) must not turn a neuron without effect into a "significant" one, and two correct implementations
    must reach the same verdicts.

    Example:
        >>> s = torch.tensor([0.9, 0.8, 0.7, 0.9, 0.6, 0.8])
        >>> cut = torch.stack([s, s * 0.5, s * 1.2 + torch.tensor([0, .01, 0, .02, 0, .01])])
        >>> v = classify_neurons(s, cut, torch.tensor([0, 0, 0, 1, 1, 1]))
        >>> [("critical", "neutral", "detrimental")[int(c)] for c in v.category]
        ['neutral', 'critical', 'detrimental']
    """
    validate_number("alpha", alpha, low=0.0, low_open=True, high=1.0)
    validate_number("rtol", rtol, low=0.0)
    m = sigma.shape[-1]
    if (
        sigma_star.dim() != 2
        or sigma_star.shape[1] != m
        or labels.shape[0] != m
        or (sigma.dim() == 2 and sigma.shape != sigma_star.shape)
        or sigma.dim() not in (1, 2)
    ):
        raise ValueError(
            f"shapes disagree: `sigma` {tuple(sigma.shape)} (expected (M,) or (N, M)), `sigma_star` "
            f"{tuple(sigma_star.shape)} (expected (N, {m})), `labels` {tuple(labels.shape)} (expected ({m},))"
        )
    sigma, sigma_star = sigma.double(), sigma_star.double()
    sigma_star = torch.where((sigma_star - sigma).abs() <= rtol * sigma.abs(), sigma.expand_as(sigma_star), sigma_star)
    counts = torch.bincount(labels)
    classes = [k for k in sorted(set(labels.tolist())) if counts[k] >= 2]  # one sample cannot be t-tested
    if not classes:
        raise ValueError("every class has fewer than 2 analysis samples; the paired t-tests need at least 2")
    p_values = _per_class_paired_p(sigma_star - sigma, labels, classes)
    significant = p_values < alpha
    xi = global_causal_effect(sigma.expand_as(sigma_star), sigma_star)
    any_sig = significant.any(dim=1)
    category = torch.full((sigma_star.shape[0],), NEUTRAL, dtype=torch.int64, device=sigma_star.device)
    category[any_sig & (xi < 0)] = CRITICAL
    category[any_sig & (xi > 0)] = DETRIMENTAL
    return NeuronVerdicts(category, xi, significant, p_values, classes)


def true_class_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """The default scoring function ``σ``: softmax probability of each sample's true class."""
    return torch.softmax(logits.double(), dim=1).gather(1, labels[:, None]).squeeze(1)


@contextlib.contextmanager
def cut_channels(consumers: Sequence[nn.Module], channels: Sequence[int]) -> Iterator[None]:
    """Cut the outgoing connections of ``channels``: zero them in the input of every consumer module.

    Hooks live only inside the context (removed even when the body raises).
    """
    idx = list(channels)

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[:, idx] = 0
        return (x,) + tuple(args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in consumers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reference_causal_scores(
    model: nn.Module,
    consumers: Sequence[nn.Module],
    neurons: Sequence[int],
    inputs: Tensor,
    labels: Tensor,
    score_fn: Callable[[Tensor, Tensor], Tensor] = true_class_probability,
) -> tuple[Tensor, Tensor]:
    """Slow, obviously-correct scoring: one full forward per cut neuron. Returns ``(σ (M,), σ* (N, M))``."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            sigma = score_fn(class_scores(model(inputs)), labels)
            stars = []
            for n in neurons:
                with cut_channels(consumers, [n]):
                    stars.append(score_fn(class_scores(model(inputs)), labels))
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return sigma, torch.stack(stars)
