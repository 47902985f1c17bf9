"""``LRPCompression``: at fit end, LRP weight relevance → prune → median-threshold mixed precision → packed export."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_xai._compile import eager_hooks
from lightning_xai._validation import validate_export_path, validate_number
from lightning_xai.attribution.lrp import Composite, Epsilon, weight_relevance
from lightning_xai.callbacks._checks import (
    refresh_averaged_copies,
    refuse_duplicates,
    refuse_lrp_with_self_compression,
    refuse_sharded_strategies,
    resolve_export_path,
)
from lightning_xai.callbacks._data import (
    check_splits,
    dataset_tensors,
    from_rank_zero,
    on_training_device,
    split_dataset,
)
from lightning_xai.evaluation import accuracy
from lightning_xai.logging import flush, log_histogram, log_scalars, log_text
from lightning_xai.pruning.cswap import class_balanced_samples
from lightning_xai.quantization.install import fixed_weights, quantized_layers
from lightning_xai.quantization.mixed import (
    apply_weight_plans,
    export_mixed,
    packed_size,
    relevance_plan,
    restore_weights,
)

__all__ = ["LRPCompression"]


@eager_hooks
class LRPCompression(pl.Callback):
    """Compress the trained model at fit end with LRP weight relevance (arXiv 2507.05286).

    Args:
        samples_per_class: analysis samples per class (class-balanced, seeded) from ``analysis_split``.
        analysis_split: "train" or "val".
        prune: "nonpositive" (the paper: prune ``R ≤ 0``) or a quantile in [0, 1) of each layer's scores.
        bits: (high, low) bit widths above / below the per-layer median of the kept weights' scores; e.g. (16, 8).
        relevance: "signed" (the paper's ``Σ_samples R_ij``) or "absolute" (``Σ_samples |R_ij|``, how much relevance
            flows through the weight whatever its sign).
        output: "target" (start from the true-class logit) or "contrastive" (other logits count against).
        composite: LRP rules per layer (default: epsilon everywhere).
        export_path: optional path of the packed ``.safetensors`` file (load with
            :func:`lightning_xai.quantization.mixed.load_mixed`).
        batch_size: LRP and evaluation batch size.
        seed: sample choice.

    The model keeps its architecture; its Linear/Conv weights become the pruned, dequantized values the packed file
    restores. On any failure the weights are restored exactly. ``self.result`` holds the measurements.

    Example:
        >>> LRPCompression(bits=(16, 8)).bits
        (16, 8)
    """

    def __init__(
        self,
        samples_per_class: int = 32,
        analysis_split: str = "train",
        prune: str | float = "nonpositive",
        bits: tuple[int, int] = (8, 4),
        relevance: str = "signed",
        output: str = "target",
        composite: Composite | None = None,
        export_path: str | os.PathLike | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        validate_number("samples_per_class", samples_per_class, low=2, integer=True)
        validate_number("batch_size", batch_size, low=1, integer=True)
        if analysis_split not in ("train", "val"):
            raise ValueError(f"`analysis_split` must be 'train' or 'val', got {analysis_split!r}")
        if relevance not in ("signed", "absolute"):
            raise ValueError(f"`relevance` must be 'signed' or 'absolute', got {relevance!r}")
        if output not in ("target", "contrastive"):
            raise ValueError(f"`output` must be 'target' or 'contrastive', got {output!r}")
        if composite is not None and not isinstance(composite, Composite):
            raise ValueError(
                f"`composite` must be a lightning_xai.attribution.lrp.Composite or None, got {composite!r} "
                "(e.g. Composite(default=Epsilon()))"
            )
        validate_number("seed", seed, low=0, integer=True)
        export_path = validate_export_path("export_path", export_path)
        relevance_plan(torch.ones(2), prune, bits)  # validates `prune` and `bits` with their own messages
        self.samples_per_class, self.analysis_split, self.prune = samples_per_class, analysis_split, prune
        self.bits, self.relevance, self.output = tuple(bits), relevance, output  # type: ignore[arg-type]
        self.composite = composite or Composite(default=Epsilon(absolute=relevance == "absolute"))
        self.export_path, self.batch_size, self.seed = export_path, batch_size, seed
        self.result: dict[str, Any] = {}
        self.done = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategies(trainer, "LRPCompression")
        refuse_duplicates(trainer, self)
        if stage == "fit":
            refuse_lrp_with_self_compression(trainer)
        if stage == "fit" and quantized_layers(pl_module):  # left by an earlier SelfCompression run: same conflict
            raise ValueError(
                "LRPCompression needs plain weights, but the model carries SelfCompression's quantizers; load the "
                "packed export into a fresh instance (`load_compressed`) and compress that"
            )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prune=str(self.prune), bits=self.bits)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a dataset the fit-end analysis cannot read is refused now, not after the training
        check_splits(trainer, (self.analysis_split, "val"), "LRPCompression")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done:
            return
        with on_training_device(trainer, pl_module):  # Lightning moved the model to the CPU before this hook
            self._fit_end(trainer, pl_module)
        if self.done:
            refresh_averaged_copies(trainer, pl_module, "LRPCompression")

    def _fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        x, y = class_balanced_samples(
            split_dataset(trainer, self.analysis_split, "LRPCompression"), self.samples_per_class, self.seed
        )
        vx, vy = dataset_tensors(split_dataset(trainer, "val", "LRPCompression"))
        device = pl_module.device
        x, y, vx, vy = x.to(device), y.to(device), vx.to(device), vy.to(device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            self._compress(trainer, pl_module, x, y, vx, vy)
        finally:
            pl_module.train(was_training)
        flush(trainer)

    def _compress(self, trainer, pl_module, x, y, vx, vy) -> None:
        relevance: dict[str, torch.Tensor] = {}
        plans = None
        if trainer.is_global_zero:  # the analysis runs once; every rank applies rank 0's plans
            relevance = weight_relevance(pl_module, x, y, self.composite, self.output, self.batch_size)
            # a weight tied to another module (an output layer sharing the embedding's matrix, …) or computed by a
            # parametrization (weight_norm, …) is left as it is: a plan would prune and quantize it for both holders
            # (and the packed file code it for one), or write into a temporary
            fixed = fixed_weights(pl_module, list(relevance))
            if fixed:
                rank_zero_info(
                    "LRPCompression: left as they are: " + "; ".join(f"{n} ({why})" for n, why in fixed.items())
                )
            plans = {
                name: relevance_plan(r, self.prune, self.bits) for name, r in relevance.items() if name not in fixed
            }
        plans = from_rank_zero(trainer, plans)
        if not plans:
            raise ValueError(
                f"LRPCompression: no layer of {type(pl_module).__name__} to compress: every layer LRP reaches holds a "
                "weight tied to another module or computed by a parametrization; the model is unchanged"
            )
        float_bytes = sum(v.numel() * v.element_size() for v in pl_module.state_dict().values())
        acc_before = accuracy(pl_module, vx, vy, self.batch_size)
        size_after = packed_size(pl_module, plans)
        saved = apply_weight_plans(pl_module, plans)
        try:
            acc_after = accuracy(pl_module, vx, vy, self.batch_size)
            exported = None
            if self.export_path is not None and trainer.is_global_zero:
                restore_weights(pl_module, saved)  # export from the original weights (same codes, exact scales)
                exported = export_mixed(pl_module, plans, resolve_export_path(self.export_path, trainer))
                apply_weight_plans(pl_module, plans)
            if self.export_path is not None:
                trainer.strategy.barrier("lightning_xai.export")
        except BaseException:
            restore_weights(pl_module, saved)
            raise
        self.done = True
        per_layer = {
            name: {"pruned": p.pruned_fraction, "mean_bits": p.mean_bits, "weights": p.keep.numel()}
            for name, p in plans.items()
        }
        self.result = {
            "device": str(pl_module.device),  # where the analysis ran
            "accuracy_before": acc_before,
            "accuracy_after": acc_after,
            "float_bytes": float_bytes,
            "packed_bytes": size_after,
            "size_ratio": size_after / float_bytes,
            "pruned_fraction": 1 - sum(p.kept for p in plans.values()) / sum(p.keep.numel() for p in plans.values()),
            "layers": per_layer,
            "exported_bytes": exported,
        }
        step = trainer.global_step
        scalars = {
            "compression/lrp/accuracy_before": acc_before,
            "compression/lrp/accuracy_after": acc_after,
            "compression/lrp/size_before_bytes": float_bytes,
            "compression/lrp/size_after_bytes": size_after,
            "compression/lrp/size_ratio": self.result["size_ratio"],
            "compression/lrp/pruned_fraction": self.result["pruned_fraction"],
        }
        for name, info in per_layer.items():
            scalars[f"compression/lrp/pruned/{name}"] = info["pruned"]
            scalars[f"compression/lrp/bits/{name}"] = info["mean_bits"]
            if name in relevance:  # rank 0
                log_histogram(trainer, f"compression/lrp/relevance/{name}", relevance[name].flatten(), step)
        log_scalars(trainer, scalars, step)
        lines = ["| layer | weights | pruned | mean bits |", "|---|---|---|---|"]
        lines += [f"| {n} | {i['weights']} | {i['pruned']:.3f} | {i['mean_bits']:.2f} |" for n, i in per_layer.items()]
        lines.append(
            f"\nsize {float_bytes} → {size_after} bytes ({self.result['size_ratio']:.3f}); "
            f"val accuracy {acc_before:.4f} → {acc_after:.4f}"
        )
        log_text(trainer, "compression/lrp/summary", "\n".join(lines), step)
        rank_zero_info(
            f"LRPCompression: pruned {self.result['pruned_fraction']:.3f} of the weights, size ratio "
            f"{self.result['size_ratio']:.3f}, val accuracy {acc_before:.4f} -> {acc_after:.4f}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
