"""``PreservationGuard``: keep compression from destroying what a preservation set says the model must keep."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_xai._compile import eager_hooks
from lightning_xai._validation import check_layer_names, validate_number
from lightning_xai.callbacks._checks import (
    refresh_averaged_copies,
    refuse_duplicates,
    refuse_sharded_strategies,
    weight_averaging_order,
)
from lightning_xai.callbacks._data import (
    check_splits,
    dataset_inputs,
    dataset_labels,
    from_rank_zero,
    split_dataset,
)
from lightning_xai.evaluation import accuracy, class_scores
from lightning_xai.figures import gradcam_figure
from lightning_xai.logging import log_figure, log_scalars, log_text, tensorboard_writers
from lightning_xai.preservation.scores import UNCERTAINTY_KINDS, gradcam_maps, model_state_guard
from lightning_xai.preservation.select import build_preservation_set
from lightning_xai.quantization.install import copy_model, is_batchnorm, quantized_layers

__all__ = ["PreservationGuard", "restore_lost_bits"]


def restore_lost_bits(
    current: dict[str, tuple[Tensor, Tensor]], snapshot: dict[str, tuple[Tensor, Tensor]]
) -> dict[str, Tensor]:
    """Channels whose bit depth fell below the snapshot's: ``{layer: bool mask}`` (pure; nothing is changed).

    Raises ``RuntimeError`` when a layer's snapshot has another channel count than the layer (the snapshot was not
    kept aligned with a physical removal): restoring the wrong channels would be worse than stopping."""
    lost: dict[str, Tensor] = {}
    for name, (b_now, _) in current.items():
        if name not in snapshot:
            continue
        b_snap = snapshot[name][0].to(b_now.device)
        if b_snap.shape != b_now.shape:
            raise RuntimeError(
                f"PreservationGuard: the snapshot of {name!r} has {b_snap.shape[0]} channels but the layer has "
                f"{b_now.shape[0]}; channels were removed without `channels_removed()` being told"
            )
        mask = b_now < b_snap
        if bool(mask.any()):
            lost[name] = mask
    return lost


@eager_hooks
class PreservationGuard(Callback):
    r"""Preservation set, ``λ·L_pres`` and precision restoration (safety-guided self-compression, arXiv 2505.00350).

    * When the set is built (at train start, or at ``build_at_step`` for models trained from scratch), ``fraction`` of
      the **training** samples are picked, class-balanced, by Grad-CAM evidence (gradient × embedding for token
      inputs), uncertainty and k-means diversity on penultimate embeddings (or ``indices`` you give).
    * Every optimizer step, ``λ·CE`` on a seeded batch of preservation samples is added to the gradients (after your
      backward, so it also reaches the bit depths before they are stepped).
    * Every ``check_every_n_steps`` the preservation accuracy is measured. Healthy (at or above the threshold): the
      bit depths and exponents are snapshotted. Below: every channel that lost bits since the snapshot gets its
      snapshot bits and exponent back (its bit-optimizer moments are reset), optionally frozen for
      ``cooldown_steps``; the event is logged as scalars and as a TensorBoard text table.
    * Channels that are dead now but alive in the snapshot are protected from physical removal.
    * At train end (before ``SelfCompression`` removes channels and exports at fit end) the accuracy is checked once
      more; if restoring lost bits is not enough (the weights drifted), the whole model goes back to the last healthy
      state (``rollback_at_end``), so the model you get meets the threshold. That rollback is logged too.

    Args:
        fraction: share of the training samples in the set.
        lam: weight ``λ`` of the preservation loss (0 disables it).
        check_every_n_steps: how often the preservation accuracy is measured.
        min_accuracy: absolute threshold. Exclusive with ``max_drop``.
        max_drop: threshold = accuracy when the set is built − ``max_drop`` (the float baseline when training starts
            from a trained model). Default 0.02 when neither is given.
        cooldown_steps: restored channels are held at their restored values for this many steps.
        build_at_step: optimizer step at which the set is built (0: at train start).
        batch_size: preservation batch for ``λ·L_pres``.
        uncertainty: ``entropy``, ``margin`` or ``least_confidence``.
        indices: use these training-set indices instead of selecting.
        seed: selection and batch seed.
        restored_penalty: factor on a channel's size penalty at each restoration of that channel (after k
            restorations it feels ``restored_penalty**k`` of the others' pressure; 0: a restored channel keeps its
            restored precision for good; 1: full pressure again, the behaviour that oscillates). The default 0.5
            converges (≤ 3 restorations per run on full MNIST) without freezing compression: with 0, a restoration
            in the first steps, when every channel has lost a little, relieved all of them and the run ended at
            8 bits (LeNet-300-100, 4.5×); with 0.5 the same run ended at 80×.
        max_candidates: at most this many training samples (class-balanced, seeded) are scored to select the set;
            ``None`` scores all. The set has ``fraction`` of the training set, capped at the pool's size.
        eval_batch_size: batch size of the preservation-accuracy checks.
        target_layer: name of the module whose activations Grad-CAM explains (e.g. ``"net.features.6"``); ``None``:
            the last Conv2d, or gradient × input for models without one (gradient × embedding for token inputs).
            Checked against the model at setup, with suggestions for near misses.
        rollback_at_end: keep a copy of the model at the last healthy check and fall back to it at train end if
            needed (costs one copy of the state dict in memory and in checkpoints).
    """

    def __init__(
        self,
        fraction: float = 0.1,
        lam: float = 0.1,
        check_every_n_steps: int = 20,
        min_accuracy: float | None = None,
        max_drop: float | None = None,
        cooldown_steps: int = 0,
        build_at_step: int = 0,
        batch_size: int = 64,
        uncertainty: str = "entropy",
        indices: list[int] | None = None,
        seed: int = 0,
        rollback_at_end: bool = True,
        restored_penalty: float = 0.5,
        max_candidates: int | None = 20_000,
        eval_batch_size: int = 512,
        target_layer: str | None = None,
    ) -> None:
        super().__init__()
        validate_number("fraction", fraction, low=0.0, low_open=True, high=1.0)
        validate_number("lam", lam, low=0.0)
        validate_number("check_every_n_steps", check_every_n_steps, low=1, integer=True)
        validate_number("min_accuracy", min_accuracy, low=0.0, high=1.0, allow_none=True)
        validate_number("max_drop", max_drop, low=0.0, high=1.0, allow_none=True)
        validate_number("cooldown_steps", cooldown_steps, low=0, integer=True)
        validate_number("build_at_step", build_at_step, low=0, integer=True)
        validate_number("batch_size", batch_size, low=1, integer=True)
        validate_number("seed", seed, low=0, integer=True)
        validate_number("max_candidates", max_candidates, low=1, integer=True, allow_none=True)
        validate_number("restored_penalty", restored_penalty, low=0.0, high=1.0)
        validate_number("eval_batch_size", eval_batch_size, low=1, integer=True)
        if min_accuracy is not None and max_drop is not None:
            raise ValueError(
                f"give either `min_accuracy` or `max_drop`, not both (got {min_accuracy!r} and {max_drop!r})"
            )
        if not isinstance(rollback_at_end, bool):
            raise ValueError(f"`rollback_at_end` must be True or False, got {rollback_at_end!r}")
        if uncertainty not in UNCERTAINTY_KINDS:
            raise ValueError(f"`uncertainty` must be one of {list(UNCERTAINTY_KINDS)}, got {uncertainty!r}")
        if indices is not None and (
            not isinstance(indices, (list, tuple))
            or not indices
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
        ):
            raise ValueError(
                f"`indices` must be a non-empty list of training-set indices (integers) or None, got {indices!r}"
            )
        if target_layer is not None and (not isinstance(target_layer, str) or not target_layer):
            raise ValueError(f"`target_layer` must be a module name (a non-empty string) or None, got {target_layer!r}")
        self.target_layer = target_layer
        self.fraction, self.lam = float(fraction), float(lam)
        self.check_every_n_steps, self.cooldown_steps = check_every_n_steps, cooldown_steps
        self.min_accuracy = min_accuracy
        self.max_drop = 0.02 if (max_drop is None and min_accuracy is None) else max_drop
        self.build_at_step, self.batch_size, self.uncertainty, self.seed = build_at_step, batch_size, uncertainty, seed
        self.given_indices = None if indices is None else [int(i) for i in indices]
        self.indices: np.ndarray | None = None
        self.baseline: float | None = None
        self.threshold: float | None = None
        self.snapshot: dict[str, tuple[Tensor, Tensor]] = {}
        self.restorations: list[dict[str, Any]] = []
        self.last_accuracy: float | None = None
        self._frozen: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._frozen_until = -1
        self._data: tuple[Tensor, Tensor] | None = None
        self._last_check = -1
        self.rollback_at_end = rollback_at_end
        self.max_candidates, self.eval_batch_size = max_candidates, eval_batch_size
        self.restored_penalty = float(restored_penalty)
        self._gen: torch.Generator | None = None
        self.rolled_back = False
        self._healthy_state: dict[str, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(fraction=self.fraction, lam=self.lam, seed=self.seed)

    # -- data -------------------------------------------------------------------------------------------------
    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = split_dataset(trainer, "train", "PreservationGuard")
        labels = dataset_labels(dataset)
        if self.indices is None:
            chosen: np.ndarray | None = None
            if self.given_indices is not None:
                bad = [i for i in self.given_indices if not 0 <= i < len(labels)]
                if bad:
                    raise ValueError(
                        f"`indices` {bad[:5]} are outside the training set (valid: 0 to {len(labels) - 1})"
                    )
                chosen = np.array(sorted(set(self.given_indices)), dtype=np.int64)
            elif trainer.is_global_zero:  # chosen once, on rank 0, and broadcast
                pool = _candidate_pool(labels, self.max_candidates, self.seed)
                inputs = dataset_inputs(dataset, pool)
                share = min(1.0, self.fraction * len(labels) / len(pool))
                model = _float_model(pl_module)
                picked = build_preservation_set(
                    model, inputs, labels[pool], share, self.seed, self.uncertainty, self._target(model)
                )
                chosen = pool[picked.indices]
            self.indices = np.asarray(from_rank_zero(trainer, chosen), dtype=np.int64)
        device = pl_module.device
        inputs = dataset_inputs(dataset, self.indices).to(device)
        # as Lightning feeds training batches: cast to the half dtype under "16-true"/"bf16-true", unchanged otherwise
        inputs = trainer.precision_plugin.convert_input(inputs)
        self._data = (inputs, labels[self.indices].to(device))
        if self.baseline is None:
            self.baseline = from_rank_zero(trainer, self.accuracy(pl_module))
            self.threshold = self.min_accuracy if self.min_accuracy is not None else self.baseline - self.max_drop
            self.snapshot = self._current(pl_module)
            if self.baseline >= self.threshold:
                self._keep_healthy(pl_module)
            rank_zero_info(
                f"PreservationGuard: {len(self.indices)} training samples selected; accuracy {self.baseline:.4f}, "
                f"threshold {self.threshold:.4f}"
            )
            self._log_gradcam(trainer, pl_module)

    def _log_gradcam(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Grad-CAM pictures of (up to 16) preservation samples, for image models with a convolution."""
        assert self._data is not None
        x, y = self._data
        if x.dim() != 4 or not tensorboard_writers(trainer):
            return
        try:
            model = _float_model(pl_module)
            maps = gradcam_maps(model, x[:16], y[:16], self._target(model))
        except ValueError:  # no Conv2d to look at
            return
        log_figure(
            trainer, "preservation/gradcam", lambda: gradcam_figure(x[:16].cpu().numpy(), maps.numpy(), y[:16]), 0
        )

    def _target(self, model: nn.Module) -> nn.Module | None:
        return None if self.target_layer is None else model.get_submodule(self.target_layer)

    def accuracy(self, pl_module: pl.LightningModule) -> float:
        """Accuracy on the preservation set (eval mode, batches of ``eval_batch_size``; modes and gradients restored;
        one host read)."""
        assert self._data is not None
        x, y = self._data
        with model_state_guard(pl_module):
            pl_module.eval()
            return accuracy(pl_module, x, y, self.eval_batch_size)

    @staticmethod
    def _current(pl_module: pl.LightningModule) -> dict[str, tuple[Tensor, Tensor]]:
        return {
            q.qualified: (q.quantizer.b.detach().clone(), q.quantizer.e.detach().clone())
            for q in quantized_layers(pl_module)
        }

    # -- hooks ------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategies(trainer, "PreservationGuard")
        refuse_duplicates(trainer, self)
        weight_averaging_order(  # its train-end check must judge (and may roll back) the model the averaging leaves
            trainer,
            self,
            "PreservationGuard",
            averaging_first=True,
            why="that callback copies its average into the model when training ends, after the guard's last check, "
            "so it would replace the model the guard judged (or rolled back)",
        )
        if self.target_layer is not None:
            check_layer_names("target_layer", [self.target_layer], pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_splits(trainer, ("train",), "PreservationGuard")  # also when the set is built later (build_at_step)
        if self.build_at_step == 0 or (self.indices is not None and trainer.global_step >= self.build_at_step):
            self._build(trainer, pl_module)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``λ·CE`` on a seeded batch of preservation samples, added to the gradients your loss produced.

        The pass runs like a training forward (train mode, under the trainer's precision context, the AMP loss scale
        applied on the device), with two differences: batch-norm running statistics are left as they were (momentum 0
        for the pass, ``num_batches_tracked`` put back), and the random state is forked and seeded per step, so dropout
        masks, like the batch, are the same on every rank. Data, batch and weights (DDP keeps them equal) being the
        same on every rank, so is the gradient it adds, without a collective. No value is read back to the host.
        """
        if self._data is None or not self.lam:
            return
        x, y = self._data
        step_seed = self.seed * 1_000_003 + trainer.global_step
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(device=x.device)
        self._gen.manual_seed(step_seed)
        if y.shape[0] > self.batch_size:
            pick = torch.randperm(y.shape[0], generator=self._gen, device=x.device)[: self.batch_size]
            x, y = x[pick], y[pick]
        plugin = trainer.precision_plugin
        norms = [m for m in pl_module.modules() if is_batchnorm(m) and m.training and m.track_running_stats]
        momenta = [m.momentum for m in norms]
        counters = [m.num_batches_tracked for m in norms if m.num_batches_tracked is not None]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            for m in norms:
                m.momentum = 0.0  # running = 1·running + 0·batch: unchanged
            with torch.random.fork_rng(devices=devices, device_type=x.device.type), torch.enable_grad():
                torch.manual_seed(step_seed)
                with plugin.forward_context():
                    logits = class_scores(pl_module(plugin.convert_input(x)))
            if counters:
                torch._foreach_sub_(counters, 1)
            loss = F.cross_entropy(logits.float(), y) * (self.lam / max(trainer.accumulate_grad_batches, 1))
            scaler = getattr(plugin, "scaler", None)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._frozen and step <= self._frozen_until:
            self._hold(pl_module)
        elif self._frozen:
            self._frozen = {}
        if self._data is None:
            if step >= self.build_at_step:
                self._build(trainer, pl_module)
            return
        if step == self._last_check or step % self.check_every_n_steps:
            return
        self._last_check = step
        self.check(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._data is None:
            return
        if self._last_check != trainer.global_step:
            self._last_check = trainer.global_step
            acc = self.check(trainer, pl_module)
        else:
            acc = from_rank_zero(trainer, self.accuracy(pl_module))
        if acc < self.threshold and self.rollback_at_end and self._healthy_state is not None:  # type: ignore[operator]
            from lightning_xai.pruning.surgery import resize_to_state_dict

            resize_to_state_dict(pl_module, self._healthy_state)
            pl_module.load_state_dict(self._healthy_state)
            after = self.accuracy(pl_module)
            self.rolled_back = True
            self.restorations.append(
                {
                    "step": trainer.global_step,
                    "layers": ["<whole model>"],
                    "channels": 0,
                    "bits_restored": 0.0,
                    "accuracy_before": round(acc, 4),
                    "accuracy_after": round(after, 4),
                    "rollback": True,
                }
            )
            log_scalars(trainer, {"preservation/rollback": 1.0, "preservation/accuracy": after}, trainer.global_step)
            refresh_averaged_copies(trainer, pl_module, "PreservationGuard")
            rank_zero_warn(
                f"PreservationGuard: accuracy {acc:.4f} stayed below {self.threshold:.4f} after restoring bits; "
                f"the model was rolled back to its last healthy state (accuracy {after:.4f})"
            )
            acc = after
        self.last_accuracy = acc

    def _keep_healthy(self, pl_module: pl.LightningModule) -> None:
        """Keep the model's state for the end-of-training rollback, on the CPU (not a second copy in GPU memory)."""
        if self.rollback_at_end:
            self._healthy_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Measure, then snapshot (healthy) or restore (below threshold). Returns the accuracy after."""
        assert self.threshold is not None
        step = trainer.global_step
        acc = from_rank_zero(trainer, self.accuracy(pl_module))  # one decision for all ranks
        metrics = {"preservation/accuracy": acc, "preservation/threshold": self.threshold}
        if acc >= self.threshold:
            self.snapshot = self._current(pl_module)
            self._keep_healthy(pl_module)
        else:
            acc = self._restore(trainer, pl_module, acc)
            metrics["preservation/accuracy_after_restore"] = acc
        self.last_accuracy = acc
        metrics["compression/restorations"] = float(len(self.restorations))
        log_scalars(trainer, metrics, step)
        return acc

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, before: float) -> float:
        current = self._current(pl_module)
        lost = restore_lost_bits(current, self.snapshot)
        layers = {q.qualified: q for q in quantized_layers(pl_module)}
        from lightning_xai.callbacks.self_compression import SelfCompression

        opt = next((cb.optimizer for cb in trainer.callbacks if isinstance(cb, SelfCompression)), None)  # type: ignore[attr-defined]
        restored_bits = 0.0
        # a transaction: if anything below raises, bits, exponents, optimizer moments and cool-downs are put back
        params = [p for name in lost for p in (layers[name].quantizer.b, layers[name].quantizer.e)]
        params += [layers[name].quantizer.relief for name in lost]
        saved_params = [p.detach().clone() for p in params]
        saved_moments = {
            (id(p), k): v.clone()
            for p in params
            for k, v in (opt.state.get(p, {}) if opt is not None else {}).items()
            if isinstance(v, Tensor)
        }
        saved_frozen = (dict(self._frozen), self._frozen_until)
        try:
            for name, mask in lost.items():
                q = layers[name].quantizer
                b_snap, e_snap = self.snapshot[name]
                b_snap, e_snap = b_snap.to(q.b.device), e_snap.to(q.e.device)
                with torch.no_grad():
                    restored_bits += float(((b_snap.clamp(min=0) - q.b.clamp(min=0)) * mask).sum())
                    q.b.copy_(torch.where(mask, b_snap, q.b))
                    q.e.copy_(torch.where(mask, e_snap, q.e))
                    # relieve the size penalty of the restored channels, so they are not driven back to the
                    # precision that hurt (without it the guard restores the same channels again and again)
                    q.relief.copy_(torch.where(mask, q.relief * self.restored_penalty, q.relief))
                if opt is not None:
                    for p in (q.b, q.e):
                        for v in opt.state.get(p, {}).values():
                            if isinstance(v, Tensor) and v.shape == p.shape:
                                v.masked_fill_(mask, 0)
                if self.cooldown_steps:
                    self._frozen[name] = (mask.clone(), q.b.detach().clone(), q.e.detach().clone())
            if self.cooldown_steps:
                self._frozen_until = trainer.global_step + self.cooldown_steps
            after = self.accuracy(pl_module)
        except BaseException:
            with torch.no_grad():
                for p, old in zip(params, saved_params):
                    p.copy_(old)
                for p in params:
                    for k, v in (opt.state.get(p, {}) if opt is not None else {}).items():
                        if (id(p), k) in saved_moments:
                            v.copy_(saved_moments[(id(p), k)])
            self._frozen, self._frozen_until = saved_frozen
            raise
        event = {
            "step": trainer.global_step,
            "layers": sorted(lost),
            "channels": int(sum(int(m.sum()) for m in lost.values())),
            "bits_restored": round(restored_bits, 3),
            "accuracy_before": round(before, 4),
            "accuracy_after": round(after, 4),
        }
        self.restorations.append(event)
        log_scalars(
            trainer,
            {"preservation/restored_channels": event["channels"], "preservation/restored_bits": restored_bits},
            trainer.global_step,
        )
        rows = "\n".join(
            f"| {e['step']} | {', '.join(e['layers'])} | {e['channels']} | {e['bits_restored']} | "
            f"{e['accuracy_before']} | {e['accuracy_after']} |"
            for e in self.restorations
        )
        log_text(
            trainer,
            "preservation/restorations",
            "| step | layers | channels | bits restored | acc before | acc after |\n|---|---|---|---|---|---|\n" + rows,
            trainer.global_step,
        )
        if not lost:
            rank_zero_warn(
                f"PreservationGuard: accuracy {before:.4f} < {self.threshold:.4f} at step {trainer.global_step}, "
                "but no channel lost bits since the last healthy snapshot (the weights drifted); nothing to restore"
            )
        return after

    def _hold(self, pl_module: pl.LightningModule) -> None:
        """Keep the restored channels at their restored values during the cool-down (no host read: ``where``)."""
        layers = {q.qualified: q for q in quantized_layers(pl_module)}
        with torch.no_grad():
            for name, (mask, b, e) in self._frozen.items():
                q = layers.get(name)
                if q is not None and q.quantizer.b.shape == mask.shape:
                    qb, qe = q.quantizer.b, q.quantizer.e
                    mask = mask.to(qb.device)
                    qb.copy_(torch.where(mask, b.to(qb.device), qb))
                    qe.copy_(torch.where(mask, e.to(qe.device), qe))

    # -- cooperation with SelfCompression's physical removal ---------------------------------------------------
    def protected_channels(self) -> dict[str, set[int]]:
        """Channels alive in the last healthy snapshot: they may be restored, so they must not be removed."""
        return {
            name.rsplit(".", 1)[0]: set(torch.nonzero(b > 0).flatten().tolist())
            for name, (b, _) in self.snapshot.items()
        }

    def channels_removed(self, report: Any) -> None:
        """Keep the snapshot (and frozen masks) aligned with the layers after channels were removed."""
        for layer, idxs in report.removed_idxs.items():
            for store in (self.snapshot, self._frozen):
                for name in [n for n in store if n.rsplit(".", 1)[0] == layer]:
                    tensors = store[name]
                    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool)
                    keep[[i for i in idxs if i < keep.numel()]] = False
                    store[name] = tuple(t[keep] for t in tensors)  # type: ignore[assignment]

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "indices": None if self.indices is None else self.indices.tolist(),
            "baseline": self.baseline,
            "threshold": self.threshold,
            "snapshot": {k: [v[0].cpu(), v[1].cpu()] for k, v in self.snapshot.items()},
            "restorations": list(self.restorations),
            "frozen": {k: [t.cpu() for t in v] for k, v in self._frozen.items()},
            "frozen_until": self._frozen_until,
            "last_check": self._last_check,
            "rolled_back": self.rolled_back,
            "healthy_state": None
            if self._healthy_state is None
            else {k: v.cpu() for k, v in self._healthy_state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        idx = state_dict.get("indices")
        self.indices = None if idx is None else np.asarray(idx, dtype=np.int64)
        self.baseline = state_dict.get("baseline")
        self.threshold = state_dict.get("threshold")
        self.snapshot = {k: (v[0], v[1]) for k, v in state_dict.get("snapshot", {}).items()}
        self.restorations = list(state_dict.get("restorations", []))
        self._frozen = {k: tuple(v) for k, v in state_dict.get("frozen", {}).items()}  # type: ignore[misc]
        self._frozen_until = int(state_dict.get("frozen_until", -1))
        self._last_check = int(state_dict.get("last_check", -1))
        self.rolled_back = bool(state_dict.get("rolled_back", False))
        self._healthy_state = state_dict.get("healthy_state")


def _candidate_pool(labels: Tensor, limit: int | None, seed: int) -> np.ndarray:
    """Sorted training indices to score: all of them, or ``limit`` drawn class-balanced (seeded) when there are
    more (chosen by index on the CPU; only these samples are read and moved to the device)."""
    n = int(labels.shape[0])
    if limit is None or n <= limit:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes = np.unique(y)
    per_class = max(1, limit // len(classes))
    chosen = [rng.permutation(np.nonzero(y == c)[0])[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _float_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or a float32 copy when it runs in half precision (``precision="16-true"/"bf16-true"``): the
    selection scores go through numpy and scikit-learn, which have no bfloat16."""
    param = next(model.parameters(), None)
    if param is None or param.dtype in (torch.float32, torch.float64):
        return model
    return copy_model(model).float()
