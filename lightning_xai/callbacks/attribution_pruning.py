"""``AttributionPruning``: at fit end, rank layers by gradient × activation (or Taylor) against L1, prune the bottom
``p`` % by zeroing or bypassing them, and report both rankings, their correlation, accuracy and CPU latency."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from scipy import stats
from torch import nn

from lightning_xai._compile import eager_hooks
from lightning_xai._validation import validate_bool, validate_number
from lightning_xai.attribution.layers import (
    DEFAULT_TYPES,
    GradientActivationScorer,
    L1Scorer,
    TaylorScorer,
    classification_loss,
)
from lightning_xai.callbacks._checks import refresh_averaged_copies
from lightning_xai.callbacks._data import (
    check_splits,
    dataset_tensors,
    from_rank_zero,
    on_training_device,
    split_dataset,
)
from lightning_xai.callbacks._resize import ResizeOnLoad
from lightning_xai.evaluation import accuracy, latency_ratio
from lightning_xai.figures import layer_rankings_figure
from lightning_xai.logging import flush, log_figure, log_scalars, log_text
from lightning_xai.pruning.layer_pruning import (
    MODES,
    bypassable_layers,
    default_candidates,
    prune_layers,
    residual_branch_ends,
    select_bottom,
)
from lightning_xai.quantization.install import copy_model, fixed_weights

__all__ = ["AttributionPruning", "compare_rankings"]

SCORERS = ("gradxact", "taylor")


def compare_rankings(a: dict[str, float], b: dict[str, float], layers: Sequence[str]) -> dict[str, float]:
    """Spearman and Kendall rank correlations of two layer scores over ``layers`` (scipy)."""
    x = [a[n] for n in layers]
    y = [b[n] for n in layers]
    return {"spearman": float(stats.spearmanr(x, y).statistic), "kendall": float(stats.kendalltau(x, y).statistic)}


@eager_hooks
class AttributionPruning(ResizeOnLoad):
    """Layer-wise pruning at fit end guided by gradient × activation, with L1 as the baseline.

    Args:
        scorer: "gradxact" (``E[Σ|∂L/∂A·A|]``, the paper) or "taylor" (``E[|Σ ∂L/∂A·A|]``).
        fraction: share of the candidate layers to prune (at least one), default 5 %.
        mode: "zero" (weights zeroed, graph unchanged) or "bypass" (layers whose output has their input's shape are
            replaced by identities, with the batch norm reading them; only those layers are candidates).
        num_batches: validation batches over which the score's expectation is taken.
        loss_fn: ``loss_fn(model, batch) -> (summed loss, samples)``; default summed cross-entropy.
        include_first_last: allow pruning the first and the last layer.
        types: layer types that count as layers.
        apply: prune the model (``False``: only score, compare and report).
        batch_size: batch size of the evaluation and the latency measurement.

    ``self.result`` holds both rankings, the pruned sets, correlations, accuracy and latency (also logged under
    ``pruning/layers/…``).

    Example:
        >>> AttributionPruning(mode="bypass").fraction
        0.05
    """

    def __init__(
        self,
        scorer: str = "gradxact",
        fraction: float = 0.05,
        mode: str = "zero",
        num_batches: int = 4,
        loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, int]] = classification_loss,
        include_first_last: bool = False,
        types: Sequence[type[nn.Module]] = DEFAULT_TYPES,
        apply: bool = True,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if scorer not in SCORERS:
            raise ValueError(f"`scorer` must be one of {SCORERS}, got {scorer!r}")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        validate_number("fraction", fraction, low=0.0, low_open=True, high=0.5)
        validate_number("num_batches", num_batches, low=1, integer=True)
        validate_number("batch_size", batch_size, low=1, integer=True)
        if not callable(loss_fn):
            raise ValueError(
                f"`loss_fn` must be a callable `loss_fn(model, batch) -> (summed loss, samples)`, got {loss_fn!r}; "
                "see lightning_xai.attribution.layers.classification_loss"
            )
        validate_bool("apply", apply)
        validate_bool("include_first_last", include_first_last)
        if (
            isinstance(types, type)
            or not types
            or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types)
        ):
            raise ValueError(f"`types` must be a non-empty tuple of nn.Module classes, got {types!r}")
        self.scorer_name, self.fraction, self.mode = scorer, fraction, mode
        self.num_batches, self.loss_fn, self.include_first_last = num_batches, loss_fn, include_first_last
        self.types, self.apply, self.batch_size = tuple(types), apply, batch_size
        self.result: dict[str, Any] = {}
        self.pruned: list[str] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scorer=self.scorer_name, mode=self.mode, fraction=self.fraction)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a dataset the fit-end analysis cannot read is refused now, not after the training
        check_splits(trainer, ("val",), "AttributionPruning")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned is not None:
            return
        with on_training_device(trainer, pl_module):  # Lightning moved the model to the CPU before this hook
            self._fit_end(trainer, pl_module)
        if self.pruned:
            refresh_averaged_copies(trainer, pl_module, "AttributionPruning")

    def _fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        vx, vy = dataset_tensors(split_dataset(trainer, "val", "AttributionPruning"))
        vx, vy = vx.to(pl_module.device), vy.to(pl_module.device)
        example = vx[: min(8, len(vx))]
        batches = [
            (vx[i : i + self.batch_size], vy[i : i + self.batch_size]) for i in range(0, len(vx), self.batch_size)
        ]
        was_training = pl_module.training
        pl_module.eval()
        try:
            self._run(trainer, pl_module, vx, vy, example, batches[: self.num_batches])
        finally:
            pl_module.train(was_training)
        flush(trainer)

    def _run(self, trainer, pl_module, vx, vy, example, batches) -> None:
        candidates = default_candidates(pl_module, example, self.types, self.include_first_last)
        if self.mode == "bypass":
            able = bypassable_layers(pl_module, example, candidates)
            ends = residual_branch_ends(pl_module, example, [c for c in candidates if c not in able])
            candidates = [c for c in candidates if c in able or c in ends]
        fixed: dict[str, str] = {}
        if self.mode == "zero":  # zeroing a tied or computed weight zeroes another layer too, or nothing
            fixed = fixed_weights(pl_module, candidates)
            if fixed:
                rank_zero_info(
                    "AttributionPruning: not candidates in mode 'zero': "
                    + "; ".join(f"{n} ({why})" for n, why in fixed.items())
                )
                candidates = [c for c in candidates if c not in fixed]
        if not candidates:
            raise ValueError(
                f"AttributionPruning: no candidate layers for mode {self.mode!r} in {type(pl_module).__name__}"
                + (f" (tied or computed weights are not candidates: {', '.join(fixed)})" if fixed else "")
            )
        count = max(1, int(self.fraction * len(candidates) + 0.5))
        if count >= len(candidates):
            remedies = ["a deeper model"]
            remedies += ["a smaller `fraction`"] if len(candidates) > 1 else []
            remedies += ["mode='zero'"] if self.mode != "zero" else []
            remedies += ["`include_first_last=True`"] if not self.include_first_last else []
            raise ValueError(
                f"AttributionPruning: `fraction`={self.fraction} of {len(candidates)} candidate layer(s) in mode "
                f"{self.mode!r} ({', '.join(candidates)}) would prune all of them (at least one layer is always "
                f"pruned); layer pruning needs {' or '.join(remedies)}"
            )
        cls = GradientActivationScorer if self.scorer_name == "gradxact" else TaylorScorer
        attr = cls(self.loss_fn, self.num_batches, layers=candidates).score(pl_module, batches)
        l1 = L1Scorer(layers=candidates).score(pl_module)
        pruned_attr = from_rank_zero(trainer, select_bottom(attr, self.fraction, candidates))
        pruned_l1 = from_rank_zero(trainer, select_bottom(l1, self.fraction, candidates))
        bench = vx[: self.batch_size]
        acc_before = accuracy(pl_module, vx, vy, self.batch_size)
        original = copy_model(pl_module)
        l1_model = copy_model(pl_module)
        prune_layers(l1_model, pruned_l1, self.mode, example)
        acc_l1, lat_l1 = accuracy(l1_model, vx, vy, self.batch_size), latency_ratio(original, l1_model, bench, 5)
        del l1_model
        target = pl_module if self.apply else copy_model(pl_module)
        record = prune_layers(target, pruned_attr, self.mode, example)  # restores the model if it fails
        acc_attr, lat_attr = accuracy(target, vx, vy, self.batch_size), latency_ratio(original, target, bench, 5)
        del original
        self.pruned = pruned_attr if self.apply else []
        corr = compare_rankings(attr, l1, candidates)
        if not all(math.isfinite(v) for v in corr.values()):
            rank_zero_warn(
                f"AttributionPruning: the rank correlation of {self.scorer_name} and L1 is undefined over "
                f"{len(candidates)} candidate layer(s) (constant scores or too few layers); it is logged as NaN"
            )
        self.result = {
            "device": str(pl_module.device),  # where the analysis ran
            "scorer": self.scorer_name,
            "mode": self.mode,
            "candidates": candidates,
            "scores": {self.scorer_name: attr, "l1": l1},
            "ranking": {self.scorer_name: sorted(candidates, key=attr.get), "l1": sorted(candidates, key=l1.get)},
            "pruned": {self.scorer_name: pruned_attr, "l1": pruned_l1},
            "removed_modules": record.removed_modules,
            **corr,
            "accuracy_before": acc_before,
            "accuracy_attr": acc_attr,
            "accuracy_l1": acc_l1,
            "latency_ratio_attr": lat_attr,
            "latency_ratio_l1": lat_l1,
        }
        step = trainer.global_step
        log_scalars(
            trainer,
            {
                "pruning/layers/spearman": corr["spearman"],
                "pruning/layers/kendall": corr["kendall"],
                "pruning/layers/accuracy_before": acc_before,
                "pruning/layers/accuracy_attr": acc_attr,
                "pruning/layers/accuracy_l1": acc_l1,
                "pruning/layers/latency_ratio_attr": self.result["latency_ratio_attr"],
                "pruning/layers/latency_ratio_l1": self.result["latency_ratio_l1"],
                "pruning/layers/pruned": len(pruned_attr),
            },
            step,
        )
        log_figure(
            trainer,
            "pruning/layers/rankings",
            lambda: layer_rankings_figure(candidates, {self.scorer_name: attr, "l1": l1}, self.result["pruned"]),
            step,
        )
        log_text(trainer, "pruning/layers/summary", _summary(self.result), step)
        rank_zero_info(
            f"AttributionPruning ({self.mode}): pruned {pruned_attr} by {self.scorer_name} (L1: {pruned_l1}); "
            f"accuracy {acc_before:.4f} -> {acc_attr:.4f} (L1: {acc_l1:.4f}); Spearman {corr['spearman']:.3f}"
        )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        pass  # zeroed layers keep their shapes; bypassed ones are other modules (no full-size plain form exists)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "pruned": self.pruned, "mode": self.mode}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pruned = state_dict.get("pruned")
        self.pruned = None if pruned is None else list(pruned)


def _summary(r: dict[str, Any]) -> str:
    name = r["scorer"]
    lines = [
        f"| layer | {name} rank | L1 rank | pruned by {name} | pruned by L1 |",
        "|---|---|---|---|---|",
    ]
    rank_a = {n: i for i, n in enumerate(r["ranking"][name])}
    rank_b = {n: i for i, n in enumerate(r["ranking"]["l1"])}
    for n in r["candidates"]:
        lines.append(
            f"| {n} | {rank_a[n]} | {rank_b[n]} | {'yes' if n in r['pruned'][name] else ''} | "
            f"{'yes' if n in r['pruned']['l1'] else ''} |"
        )
    lines += [
        "",
        f"Spearman {r['spearman']:.3f}, Kendall {r['kendall']:.3f}; accuracy {r['accuracy_before']:.4f} → "
        f"{r['accuracy_attr']:.4f} ({name}) / {r['accuracy_l1']:.4f} (L1); latency ratio "
        f"{r['latency_ratio_attr']:.3f} / {r['latency_ratio_l1']:.3f} ({r['mode']})",
    ]
    return "\n".join(lines)
