"""``CSWAPPruning``: causal structured pruning at fit end (C-SWAP), physical removal, curves and SAUCE."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_xai._compile import eager_hooks
from lightning_xai._validation import (
    validate_bool,
    validate_export_path,
    validate_names,
    validate_number,
)
from lightning_xai.callbacks._checks import refresh_averaged_copies, resolve_export_path
from lightning_xai.callbacks._data import (
    check_splits,
    dataset_tensors,
    from_rank_zero,
    on_training_device,
    split_dataset,
)
from lightning_xai.callbacks._resize import ResizeOnLoad, plain_weights_for_spawn
from lightning_xai.evaluation import accuracy, count_macs, latency_ratio, measure_latency
from lightning_xai.figures import categories_figure, pruning_curves_figure
from lightning_xai.logging import flush, log_figure, log_scalars, log_text
from lightning_xai.pruning.cswap import (
    METHODS,
    PruningCurve,
    PruningOrder,
    cbp_order,
    class_balanced_samples,
    cswap_order,
    magnitude_order,
    plan_from_order,
    prefix_for_ratio,
    pruning_curve,
    random_order,
)
from lightning_xai.pruning.units import apply_plan, find_units, save_pruned
from lightning_xai.quantization.install import copy_model

__all__ = ["CSWAPPruning"]


@eager_hooks
class CSWAPPruning(ResizeOnLoad):
    """Prune the trained model at fit end with C-SWAP (or C-BP / OMP / random), without fine-tuning.

    Args:
        target_ratio: fraction of the model's parameters to remove; ``None`` removes exactly the neurons C-SWAP found
            non-critical (neutral or detrimental). With a ratio, the order's prefix reaching it is removed (for
            C-SWAP: the non-critical neurons first, then critical ones by ``ξ``).
        method: "cswap" (algorithm 1), "cbp" (algorithm 4), "omp" or "random".
        samples_per_class: analysis samples ``M_k`` per class, drawn class-balanced from ``analysis_split``.
        analysis_split: "train" or "val" — where the analysis samples come from.
        alpha: significance level of the per-class paired t-tests.
        mode: "fast" (cached prefix, batched) or "reference" (one full forward per neuron); same decisions.
        curves: methods whose pruning curves (accuracy on the validation set vs % parameters removed) and SAUCE are
            computed and logged; ``()`` skips them.
        curve_points: points per curve.
        export_path: optional ``.safetensors`` path for the pruned model (load with
            :func:`lightning_xai.pruning.units.load_pruned` into a fresh instance).
        ignore: layer names never pruned (their output channels).
        batch_size: evaluation batch size.
        seed: sample choice and the random baseline.
        progress: show a progress bar with neurons/s.

    After fit, ``self.result`` holds what was measured (also logged under ``pruning/…``).

    Example:
        >>> cb = CSWAPPruning(target_ratio=0.5)
        >>> cb.method, cb.samples_per_class
        ('cswap', 64)
    """

    def __init__(
        self,
        target_ratio: float | None = None,
        method: str = "cswap",
        samples_per_class: int = 64,
        analysis_split: str = "train",
        alpha: float = 0.05,
        mode: str = "fast",
        curves: tuple[str, ...] = ("cswap", "omp", "random"),
        curve_points: int = 21,
        export_path: str | os.PathLike | None = None,
        ignore: tuple[str, ...] = (),
        batch_size: int = 256,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        validate_number("target_ratio", target_ratio, low=0.0, low_open=True, high=1.0, allow_none=True)
        if target_ratio == 1.0:
            raise ValueError("`target_ratio` must be < 1 (some parameters must remain), got 1.0")
        validate_number("samples_per_class", samples_per_class, low=2, integer=True)
        validate_number("alpha", alpha, low=0.0, low_open=True, high=1.0)
        validate_number("curve_points", curve_points, low=2, integer=True)
        validate_number("batch_size", batch_size, low=1, integer=True)
        self.target_ratio = target_ratio
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
        if target_ratio is None and method != "cswap":
            raise ValueError(
                f"`target_ratio`=None (remove the non-critical neurons) needs `method`='cswap', got {method!r}"
            )
        curves = validate_names("curves", curves, "method names")
        bad = [c for c in curves if c not in METHODS]
        if bad:
            raise ValueError(f"`curves` entries must be among {METHODS}, got {bad}")
        if analysis_split not in ("train", "val"):
            raise ValueError(f"`analysis_split` must be 'train' or 'val', got {analysis_split!r}")
        if mode not in ("fast", "reference"):
            raise ValueError(f"`mode` must be 'fast' or 'reference', got {mode!r}")
        self.method = method
        self.samples_per_class = samples_per_class
        self.analysis_split = analysis_split
        self.alpha = alpha
        self.mode = mode
        self.curves = tuple(curves)
        self.curve_points = curve_points
        self.export_path = validate_export_path("export_path", export_path)
        self.ignore = validate_names("ignore", ignore)
        validate_bool("progress", progress)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.progress = progress
        self.result: dict[str, Any] = {}
        self.plan: dict[str, list[int]] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, target_ratio=self.target_ratio)

    # -- the work ---------------------------------------------------------------------------------------------
    def _order(self, method: str, model: nn.Module, units: list, x: Tensor, y: Tensor) -> PruningOrder:
        kwargs = dict(alpha=self.alpha, mode=self.mode, batch_size=self.batch_size, progress=self.progress)
        if method == "cswap":
            return cswap_order(model, units, x, y, **kwargs)
        if method == "cbp":
            return cbp_order(model, units, x, y, **kwargs)
        if method == "omp":
            return magnitude_order(units)
        return random_order(units, self.seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a dataset the fit-end analysis cannot read is refused now, not after the training
        check_splits(trainer, (self.analysis_split, "val"), "CSWAPPruning")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan is not None:  # already pruned (e.g. a resumed run that reached fit end before)
            return
        with on_training_device(trainer, pl_module):  # Lightning moved the model to the CPU before this hook
            self._fit_end(trainer, pl_module)
        if self.plan is not None:
            refresh_averaged_copies(trainer, pl_module, "CSWAPPruning")

    def _fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        analysis = split_dataset(trainer, self.analysis_split, "CSWAPPruning")
        x, y = class_balanced_samples(analysis, self.samples_per_class, self.seed)
        vx, vy = dataset_tensors(split_dataset(trainer, "val", "CSWAPPruning"))
        device = pl_module.device
        x, y, vx, vy = x.to(device), y.to(device), vx.to(device), vy.to(device)
        example = x[: min(8, x.shape[0])]
        was_training = pl_module.training
        pl_module.eval()
        try:
            self._prune(trainer, pl_module, x, y, vx, vy, example)
        finally:
            pl_module.train(was_training)
        plain_weights_for_spawn(trainer, pl_module)
        flush(trainer)

    def _prune(self, trainer, pl_module, x, y, vx, vy, example) -> None:
        units, refused = find_units(pl_module, example, ignore=self.ignore)
        if not units:
            raise ValueError(f"CSWAPPruning found no prunable layer in {type(pl_module).__name__}; refused: {refused}")
        params_before = sum(p.numel() for p in pl_module.parameters())
        flops_before, _ = count_macs(pl_module, example[:1])
        latency_before = measure_latency(pl_module, vx[: self.batch_size])
        acc_before = accuracy(pl_module, vx, vy, self.batch_size)

        orders: dict[str, PruningOrder] = {}
        if trainer.is_global_zero:  # the analysis runs once; every rank applies rank 0's order
            for method in dict.fromkeys((self.method, *self.curves)):
                orders[method] = self._order(method, pl_module, units, x, y)
        main = from_rank_zero(trainer, orders.get(self.method))
        if self.target_ratio is None:
            k = main.non_critical
        else:
            k = prefix_for_ratio(pl_module, units, main.order, self.target_ratio)
        plan = plan_from_order(units, main.order, k)
        curves: list[PruningCurve] = [
            pruning_curve(pl_module, units, orders[m], vx, vy, self.curve_points, self.batch_size)
            for m in self.curves
            if m in orders
        ]
        original = copy_model(pl_module)  # to time both alternately (the machine's drifts hit both alike)
        apply_plan(pl_module, units, plan, example)  # transactional: the model is untouched if this raises
        self.plan = plan
        params_after = sum(p.numel() for p in pl_module.parameters())
        flops_after, _ = count_macs(pl_module, example[:1])
        ratio = latency_ratio(original, pl_module, vx[: self.batch_size], rounds=5)
        latency_after = latency_before * ratio
        del original
        acc_after = accuracy(pl_module, vx, vy, self.batch_size)

        result: dict[str, Any] = {
            "method": self.method,
            "neurons_removed": k,
            "neurons_total": len(main.order),
            "params_before": params_before,
            "params_after": params_after,
            "params_ratio": params_after / params_before,
            "flops_before": int(flops_before),
            "flops_after": int(flops_after),
            "latency_before_s": latency_before,
            "latency_after_s": latency_after,
            "latency_ratio": ratio,
            "accuracy_before": acc_before,
            "accuracy_after": acc_after,
            "sauce": {c.method: c.sauce for c in curves},
            "categories": main.category_fractions(),
            "neurons_per_s": main.neurons_per_s if main.neurons_evaluated else None,
            "refused": refused,
            "device": str(pl_module.device),  # where the analysis ran
        }
        self.result = result
        self.curves_ = curves
        self.order_ = main
        self.units_ = units
        step = trainer.global_step
        scalars = {
            "pruning/params_before": params_before,
            "pruning/params_after": params_after,
            "pruning/params_ratio": result["params_ratio"],
            "pruning/flops_before": flops_before,
            "pruning/flops_after": flops_after,
            "pruning/latency_before_ms": 1e3 * latency_before,
            "pruning/latency_after_ms": 1e3 * latency_after,
            "pruning/latency_ratio": result["latency_ratio"],
            "pruning/accuracy_before": acc_before,
            "pruning/accuracy_after": acc_after,
            "pruning/neurons_removed": k,
        }
        scalars.update({f"pruning/sauce/{m}": v for m, v in result["sauce"].items()})
        scalars.update({f"pruning/categories/{c}": v for c, v in result["categories"].items()})
        log_scalars(trainer, scalars, step)
        if curves:
            log_figure(trainer, "pruning/curves", lambda: pruning_curves_figure(curves, acc_before), step)
        if main.category:
            log_figure(trainer, "pruning/categories", lambda: categories_figure(main.categories_per_unit(units)), step)
        log_text(trainer, "pruning/summary", _summary(result, main.categories_per_unit(units)), step)
        rank_zero_info(
            f"CSWAPPruning: removed {k}/{len(main.order)} neurons, parameters {params_before} -> {params_after} "
            f"({result['params_ratio']:.3f}), val accuracy {acc_before:.4f} -> {acc_after:.4f}, "
            f"latency ratio {result['latency_ratio']:.3f}"
        )
        if self.export_path is not None:
            path = resolve_export_path(self.export_path, trainer)
            if trainer.is_global_zero:
                save_pruned(pl_module, path, plan)  # type: ignore[arg-type]
                rank_zero_info(f"CSWAPPruning: pruned model written to {path}")
            trainer.strategy.barrier("lightning_xai.export")

    # -- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "plan": self.plan, "result": {k: v for k, v in self.result.items() if k != "refused"}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        plan = state_dict.get("plan")
        self.plan = None if plan is None else {k: list(v) for k, v in plan.items()}
        self.result = dict(state_dict.get("result", {}))


def _summary(result: dict[str, Any], per_unit: dict[str, dict[str, int]]) -> str:
    lines = [
        "| metric | value |",
        "|---|---|",
        f"| method | {result['method']} |",
        f"| neurons removed | {result['neurons_removed']} / {result['neurons_total']} |",
        f"| parameters | {result['params_before']:,} → {result['params_after']:,} ({result['params_ratio']:.3f}) |",
        f"| FLOPs (MACs) | {result['flops_before']:,} → {result['flops_after']:,} |",
        f"| CPU latency ratio | {result['latency_ratio']:.3f} |",
        f"| val accuracy | {result['accuracy_before']:.4f} → {result['accuracy_after']:.4f} |",
    ]
    lines += [f"| SAUCE {m} | {v:.1f} |" for m, v in result["sauce"].items()]
    if per_unit:
        lines += ["", "| unit | critical | neutral | detrimental |", "|---|---|---|---|"]
        lines += [f"| {n} | {c['critical']} | {c['neutral']} | {c['detrimental']} |" for n, c in per_unit.items()]
    return "\n".join(lines)
