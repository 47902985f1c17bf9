"""``SelfCompression``: learnable bit depths during training, with physical removal of 0-bit channels."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_xai._compile import eager_hooks, is_compiled
from lightning_xai._validation import validate_bool, validate_export_path, validate_number
from lightning_xai.callbacks._checks import (
    refresh_averaged_copies,
    refuse_duplicates,
    refuse_lrp_with_self_compression,
    refuse_sharded_strategies,
    resolve_export_path,
    weight_averaging_order,
)
from lightning_xai.callbacks._data import from_rank_zero, on_training_device
from lightning_xai.callbacks._resize import plain_weights_for_spawn, register_resize_hook, save_plain_checkpoint
from lightning_xai.figures import bits_heatmap_figure
from lightning_xai.logging import flush, log_figure, log_histogram, log_scalars, log_text, tensorboard_writers
from lightning_xai.mixin import CompressionMixin
from lightning_xai.pruning.heads import dead_heads
from lightning_xai.pruning.surgery import apply_cuts, dead_channels, plain_gate_keys, remove_dead_channels
from lightning_xai.quantization.engine import SelfCompressor
from lightning_xai.quantization.export import export_compressed
from lightning_xai.quantization.install import BatchNormFollowerRecorder, apply_batchnorm_gates, quantized_layers
from lightning_xai.quantization.keep import KEEP_CHOICES, StrongestHold, dead_layers, output_cutting_layers

__all__ = ["SelfCompression"]


@eager_hooks
class SelfCompression(Callback):
    r"""Learn a bit depth per output channel while training, and remove channels that reach 0 bits.

    The callback works on an unmodified ``LightningModule``:

    * ``setup``: puts a quantizer ``q(w, b, e)`` on every selected Conv1d/Conv2d/Linear (and attention input
      projection), before optimizers exist and before a checkpoint is restored.
    * ``on_fit_start``: takes ``b``/``e`` out of your optimizer(s) and trains them with their own Adam
      (``bits_lr``, ``bits_eps``; the settings of the self-compression paper by default). Your optimizer, its
      learning-rate schedulers and its settings keep driving the weights.
    * every forward of your LightningModule (``self(x)``) on an accelerator (GPU): all quantizers and gates run as
      one batched operation (a handful of kernels for the whole model instead of ~25 per layer; bit-identical to
      the per-layer quantizer, which a layer called outside that forward still uses). Under DDP the weight gradients
      then become ready together at the end of the backward, so the all-reduce overlaps less with it. On the CPU
      each layer quantizes itself (there the batching's concatenations cost more than they save; see ``compile``).
      Either way a ``channels_last`` model keeps its layout: quantized weights and their gradients come back
      ``channels_last``, so the convolutions convert neither.
    * every optimizer step: adds the gradient of ``γ·Q + α·L1`` (exact; the penalty depends on parameters only) to
      the gradients your loss produced, then steps ``b``/``e``.
    * every ``remove_every_n_steps``: physically removes 0-bit channels (and the inputs of the layers that consume
      them, batch norms and residual partners), carrying optimizer state along; the outputs are checked unchanged.
      Under multi-process strategies removal waits for ``on_fit_end`` (the channels output zero meanwhile), and so it
      does with Lightning's ``EMAWeightAveraging`` / ``WeightAveraging`` / ``StochasticWeightAveraging``, whose copy of
      the model must keep its shapes (list them after this callback; the export then holds the averaged weights),
      and with a compiled model (``trainer.fit(torch.compile(model))``), whose step would recompile at each change of
      shape. The callbacks' own forwards of a compiled model (checks, analyses) run eagerly; its step stays compiled.
    * every ``log_every_n_steps``: logs ``compression/bits_total``, ``compression/bits_ratio``,
      ``compression/size_ratio``, ``compression/channels_alive``, per-layer channels and bit histograms.

    Args:
        gamma: weight ``γ`` of the size penalty ``Q`` (average stored bits per original weight).
        alpha: weight ``α`` of the L1 penalty on the weights (mean ``|w|`` over the quantized weights at install).
            Weights it pushes to a zero code cost almost nothing in the entropy-coded export: on full MNIST's
            LeNet-300-100 ``alpha=10`` (with ``gamma=0.02, gamma_warmup=0.5``) is the recommended setting.
        init_bits: initial bit depth of every channel.
        include: regex (``re.search``) of layer names to quantize; ``None`` means all Conv/Linear layers. A layer
            whose weight another module holds too (tied weights) stays in float, with a warning.
        exclude: regex of layer names to keep in float.
        bits_lr: Adam learning rate of ``b`` and ``e``.
        bits_eps: Adam epsilon of ``b`` and ``e``.
        remove_every_n_steps: removal period in optimizer steps; 0 disables removal during training.
        remove_at_fit_end: remove 0-bit channels once more when fitting ends.
        log_every_n_steps: logging period in optimizer steps; 0 disables periodic logging.
        freeze_bits_after: fraction of the training steps (``trainer.estimated_stepping_batches``) after which
            ``b``/``e`` stop changing, so the weights settle at their final precision (1.0: never freeze). The
            default 0.8 is what keeps accuracy at the float level in the benchmarks.
        gamma_warmup: fraction of the training steps over which the size pressures ``γ`` and ``α`` ramp linearly
            from 0 to ``gamma`` and ``alpha`` (0: the full penalty from the first step). The network first learns
            its task at 8 bits, then compresses; on full MNIST's LeNet-5-Caffe (``gamma=0.1``) a ramp over half the
            steps gave 145× at 0.14 points below float (6 seeds) where the full penalty from the start gave 170× at
            0.17 below (3 seeds) (BENCHMARKS.md, ``mnist``, which has the current numbers).
        gamma_delay: fraction of the training steps before the size pressures start (0 until then; the warm-up ramp,
            if any, begins there). The network first trains at ``init_bits`` as it would in float, then compresses
            in the steps left before ``freeze_bits_after`` (which must come later). Measured on full MNIST it gave
            no reliable gain over the plain ramp (its accuracy varied more between seeds).
        export_path: if given, the packed model is written there at fit end (rank zero); ``{log_dir}`` in it is the
            run's log folder (e.g. ``"{log_dir}/model.safetensors"``). The file is
            :func:`~lightning_xai.quantization.export.export_compressed`'s ``coding="auto"``: the codes entropy-coded
            when that is smaller, so ``exported_bytes`` can be below the logged (bit-stream) size.
        keep_channels: which layers keep their strongest channel at ≥ 2 bits whatever the penalty says: ``"cut"``
            (default) the layers whose loss of every channel would make the model's output independent of its input
            (found once, on the first training batch, by trying each: in a plain stack every layer, in a residual
            network the stem and the head but not the branches); ``"all"`` every quantized layer; ``"none"`` no
            layer. Whatever the choice, a warning names each layer that loses every channel.
        compile: on the CPU, run the large float32 layers' quantizer through ``torch.compile``'d kernels (inductor
            fuses each direction into one loop: about a quarter of the eager quantizer's time per step; the first
            step pays the compilation, ≈ 10–20 s once per process). ``"auto"`` (default) does so only when the
            quantized layers hold at least 2 million weights (ResNet-18/50 yes, the LeNets no), where the saving
            repays the compilation within about a thousand steps; ``True`` / ``False`` force it. Falls back to the
            eager quantizer with a warning where compilation fails. No effect on GPUs, where the batched quantizer
            (one node for all layers) is faster.

    Example:
        >>> cb = SelfCompression(gamma=0.05, exclude=r"classifier")
        >>> cb.compressor.gamma
        0.05
    """

    def __init__(
        self,
        gamma: float = 0.02,
        alpha: float = 0.0,
        init_bits: float = 8.0,
        include: str | None = None,
        exclude: str | None = None,
        bits_lr: float = 0.5,
        bits_eps: float = 1e-3,
        remove_every_n_steps: int = 100,
        remove_at_fit_end: bool = True,
        log_every_n_steps: int = 50,
        freeze_bits_after: float = 0.8,
        gamma_warmup: float = 0.0,
        gamma_delay: float = 0.0,
        export_path: str | None = None,
        keep_channels: str = "cut",
        compile: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.compressor = SelfCompressor(
            gamma=gamma, alpha=alpha, init_bits=init_bits, include=include, exclude=exclude, compile=compile
        )
        validate_number("bits_lr", bits_lr, low=0.0, low_open=True)
        validate_number("bits_eps", bits_eps, low=0.0, low_open=True)
        validate_number("remove_every_n_steps", remove_every_n_steps, low=0, integer=True)
        validate_number("log_every_n_steps", log_every_n_steps, low=0, integer=True)
        validate_number("freeze_bits_after", freeze_bits_after, low=0.0, high=1.0)
        validate_number("gamma_warmup", gamma_warmup, low=0.0, high=1.0)
        validate_number("gamma_delay", gamma_delay, low=0.0, high=1.0)
        if gamma_delay > 0.0 and gamma_delay >= freeze_bits_after:
            raise ValueError(
                f"`gamma_delay` ({gamma_delay!r}) must be below `freeze_bits_after` ({freeze_bits_after!r}): the bit "
                "depths would be frozen before the size pressure starts"
            )
        validate_bool("remove_at_fit_end", remove_at_fit_end)
        export_path = validate_export_path("export_path", export_path)
        if not isinstance(keep_channels, str) or keep_channels not in KEEP_CHOICES:
            raise ValueError(f"`keep_channels` must be one of {KEEP_CHOICES}, got {keep_channels!r}")
        self.keep_channels = keep_channels
        self._held: list[str] | None = None  # names of the layers whose strongest channel is held alive
        self._hold = StrongestHold(KEEP_BITS)
        self._warned_dead: set[str] = set()
        self.bits_lr = float(bits_lr)
        self.bits_eps = float(bits_eps)
        self.remove_every_n_steps = int(remove_every_n_steps)
        self.remove_at_fit_end = remove_at_fit_end
        self.log_every_n_steps = int(log_every_n_steps)
        self.freeze_bits_after = float(freeze_bits_after)
        self._freeze_step: float = float("inf")
        self.gamma_warmup = float(gamma_warmup)
        self._warmup_steps = 0.0
        self.gamma_delay = float(gamma_delay)
        self._delay_steps = 0.0
        self.export_path = export_path
        self.optimizer: torch.optim.Optimizer | None = None
        self.channels_removed = 0
        self.heads_removed = 0
        self.removed_per_layer: dict[str, int] = {}  # layer -> output channels (attention: q/k/v rows) removed
        self.idle_removed = 0  # of those, channels not at 0 bits whose every consumer was silent
        self.last_removal: Any = None
        self.exported_bytes: int | None = None
        self._bn_pairs: list[tuple[str, str]] | None = None  # (batch-norm name, quantized layer name)
        self._pending_state: dict[str, Any] | None = None
        self._last_step = -1
        self._example_inputs: Any = None
        self._hooks: list[Any] = []
        self._recorder: BatchNormFollowerRecorder | None = None
        self._last_periodic = -1
        self._averaging = False  # a weight-averaging callback follows (set at setup): removal waits for fit end
        self._compiled = False  # Lightning compiled the model's steps (set at setup): removal waits for fit end
        self._warned_inputs = False
        self._unremovable: dict[str, str] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            gamma=self.compressor.gamma, include=self.compressor.include, exclude=self.compressor.exclude
        )

    # -- set-up ---------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategies(trainer, "SelfCompression")
        refuse_duplicates(trainer, self)
        if stage == "fit":
            refuse_lrp_with_self_compression(trainer)
        # a weight-averaging callback's copy of the model must keep its shapes: removal then waits for fit end, which
        # comes after that callback copied the averaged weights back (so the export holds the averaged model)
        self._averaging = weight_averaging_order(
            trainer,
            self,
            "SelfCompression",
            averaging_first=False,
            why="it copies the model in its setup, before SelfCompression installs its quantizers, so its averaged "
            "copy would not match the model",
        )
        if self._averaging and self.remove_every_n_steps and stage == "fit":
            rank_zero_info(
                "SelfCompression: a weight-averaging callback keeps a copy of the model, so 0-bit channels are removed "
                "at fit end only (they output zero meanwhile)"
            )
        # a compiled model (`trainer.fit(torch.compile(model))`): every change of a parameter's shape recompiles the
        # step, and after 8 of them dynamo runs it eagerly for good; removal waits for fit end instead
        self._compiled = is_compiled(pl_module)
        if self._compiled and self.remove_every_n_steps and stage == "fit":
            rank_zero_info(
                "SelfCompression: the model is compiled (torch.compile), so 0-bit channels are removed at fit end "
                "only (removing them during training would recompile it each time; they output zero meanwhile)"
            )
        if stage != "fit" and not quantized_layers(pl_module):
            # `trainer.validate/test/predict` train nothing: a model that was never compressed is evaluated as it is
            # (installing the quantizers would change it and evaluate its 8-bit version); a SelfCompression checkpoint
            # holds the plain, quantized weights, which such a model loads as they are
            call = getattr(stage, "value", stage)  # a TrainerFn prints as "TrainerFn.VALIDATING"
            rank_zero_info(
                f"SelfCompression: `trainer.{call}` on a model without quantizers evaluates it as it is (nothing is "
                "installed outside `fit`)"
            )
            return
        self.compressor.install(pl_module)
        if isinstance(pl_module, CompressionMixin):
            pl_module._lxai_compressor = self.compressor
        if not self._hooks:
            self._hooks.append(register_resize_hook(trainer, pl_module))
            self._hooks.append(pl_module.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.compressor.detach()  # the batched quantization's forward hooks (setup attaches them again)
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None
        self._example_inputs = None

    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:
            self._example_inputs = (
                tuple(a.detach() if isinstance(a, Tensor) else a for a in args),
                {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()},
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self.compressor.quant_parameters()
        ids = {id(p) for p in params}
        taken = 0
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                kept = [p for p in group["params"] if id(p) not in ids]
                taken += len(group["params"]) - len(kept)
                for p in group["params"]:
                    if id(p) in ids:
                        opt.state.pop(p, None)
                group["params"] = kept
        if taken:
            rank_zero_info(
                f"SelfCompression: {taken} bit-depth/exponent tensors moved from your optimizer to their own Adam "
                f"(lr={self.bits_lr}, eps={self.bits_eps})"
            )
        self.optimizer = _bits_optimizer(params, self.bits_lr, self.bits_eps)
        device = params[0].device if params else pl_module.device
        self._found_inf = torch.zeros((), device=device)
        self._one = torch.ones((), device=device)
        self._skipped = torch.zeros((), device=device)
        self._skipped_reported = 0
        for p in params:
            p.requires_grad_(True)  # a previous fit may have frozen them
        pending = self._pending_state
        if pending is not None:
            if pending.get("optimizer") is not None:
                self.optimizer.load_state_dict(pending["optimizer"])
            self._pending_state = None
        if self._bn_pairs is not None:
            self._apply_gates(pl_module)
        self._freeze_step = float("inf")
        self._warmup_steps = 0.0
        self._delay_steps = 0.0
        self.compressor.gamma_scale = 1.0
        total = trainer.estimated_stepping_batches
        if self.freeze_bits_after < 1.0:
            if math.isfinite(total):
                self._freeze_step = self.freeze_bits_after * total
            else:
                rank_zero_warn("SelfCompression: `freeze_bits_after` needs a finite training length; ignoring it")
        for name in ("gamma_delay", "gamma_warmup"):
            if getattr(self, name) > 0.0 and not math.isfinite(total):
                rank_zero_warn(f"SelfCompression: `{name}` needs a finite training length; ignoring it")
        if math.isfinite(total):
            self._delay_steps = self.gamma_delay * total
            self._warmup_steps = self.gamma_warmup * total
        self._update_gamma_scale(trainer.global_step)  # a resumed fit continues the schedule where it was

    def _update_gamma_scale(self, step: int) -> None:
        """γ (and α) are 0 for the first ``gamma_delay`` of the training steps, then ramp linearly to their full value
        over the next ``gamma_warmup`` of them (a Python float: no device work)."""
        if self._delay_steps > 0.0 or self._warmup_steps > 0.0:
            past = step - self._delay_steps
            if past < 0.0:
                self.compressor.gamma_scale = 0.0
            else:
                self.compressor.gamma_scale = min(1.0, past / self._warmup_steps) if self._warmup_steps > 0.0 else 1.0

    @property
    def frozen(self) -> bool:
        """Whether ``b``/``e`` no longer change (after ``freeze_bits_after``)."""
        return self._last_step >= self._freeze_step

    # -- batch-norm detection (first training forward) ------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update_gamma_scale(trainer.global_step)  # before the forward: the mixin's loss uses it too
        if self._bn_pairs is not None or self._recorder is not None:
            return
        self._recorder = BatchNormFollowerRecorder(pl_module)
        self._recorder.start()

    def _finish_detection(self, pl_module: pl.LightningModule) -> None:
        if self._recorder is None or not self._recorder.active:
            return
        self._bn_pairs = self._recorder.stop()
        self._recorder = None
        self._apply_gates(pl_module)

    def _apply_gates(self, pl_module: pl.LightningModule) -> None:
        apply_batchnorm_gates(pl_module, self._bn_pairs or [])

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not before the backward: folding a gate into γ/β re-registers those tensors, which the backward of the
        # forward that just ran still needs unchanged
        self._finish_detection(pl_module)

    # -- the optimizer step of b and e ----------------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.optimizer is None or trainer.global_step == self._last_step:
            return  # second optimizer of the same step (e.g. GANs): b/e are stepped once
        self._last_step = trainer.global_step
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        uses_mixin = isinstance(pl_module, CompressionMixin) and pl_module._lxai_penalty_step == trainer.global_step
        if self.frozen:
            if self.compressor.alpha and not uses_mixin:  # the L1 term still acts on the weights
                self.compressor.add_penalty_gradients(bits=False)
            self.optimizer.zero_grad(set_to_none=True)
            if trainer.world_size == 1:  # no b/e gradients at all from now on (DDP needs every gradient it knows)
                for p in params:
                    p.requires_grad_(False)
            return
        # Everything below is device work without host reads: unscale + non-finite check in one op (AMP's own), the
        # penalty gradient as a few vectorised ops, and a fused Adam that skips itself when ``found_inf`` is set.
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            self._found_inf.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found_inf, _inverse_scale(trainer, self._one))
            _tell_the_scaler(trainer, optimizer, self._found_inf)
        if not uses_mixin:
            self.compressor.add_penalty_gradients()
        if grads and getattr(self.optimizer, "defaults", {}).get("fused"):
            self.optimizer.found_inf = self._found_inf  # type: ignore[attr-defined]
            self.optimizer.step()
            self._skipped.add_(self._found_inf)
        elif not grads or not bool(self._found_inf):  # fallback optimizer (no fused kernel): one host read
            self.optimizer.step()
        else:
            self._skipped.add_(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        if self._held:
            held = set(self._held)
            self._hold([layer.quantizer.b for layer in self.compressor.layers if layer.name in held])

    def _report_skipped(self, trainer: pl.Trainer) -> None:
        """Warn (at logging time, where a host read is fine) about steps skipped for non-finite b/e gradients."""
        if self.optimizer is None or not hasattr(self, "_skipped"):
            return
        skipped = int(self._skipped)
        if skipped > self._skipped_reported:
            rank_zero_warn(
                f"SelfCompression: {skipped - self._skipped_reported} bit-depth steps skipped for non-finite "
                f"gradients (total {skipped}, last check at step {trainer.global_step})"
            )
            self._skipped_reported = skipped

    # -- periodic work --------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._finish_detection(pl_module)
        if self._held is None:
            self._find_held(trainer, pl_module)
        step = trainer.global_step
        if step == 0 or self._last_periodic == step:
            return
        self._last_periodic = step
        removal = self.remove_every_n_steps and step % self.remove_every_n_steps == 0
        logging = self.log_every_n_steps and step % self.log_every_n_steps == 0
        if removal or logging:
            self._warn_dead_layers(step)
        if removal and trainer.world_size == 1 and not self._averaging and not self._compiled:
            self._remove(trainer, pl_module)
        if logging:
            self.log_state(trainer, step, figure=step % (10 * self.log_every_n_steps) == 0)
            self._report_skipped(trainer)

    def _find_held(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Which layers keep a channel alive (``keep_channels``): decided once, on rank 0, and broadcast."""
        names = [layer.name for layer in self.compressor.layers]
        if self.keep_channels == "none":
            self._held = []
        elif self.keep_channels == "all":
            self._held = names
        else:
            inputs = self._inputs(pl_module)
            if inputs is None:
                return  # no example input yet: try again after the next batch
            cutting = (
                output_cutting_layers(pl_module, self.compressor.layers, inputs) if trainer.is_global_zero else None
            )
            cutting = from_rank_zero(trainer, cutting)
            self._held = names if cutting is None else list(cutting)
        if self._held:
            rank_zero_info(
                f"SelfCompression: the strongest channel of {len(self._held)} layer(s) is kept at >= {KEEP_BITS:g} "
                f"bits (`keep_channels={self.keep_channels!r}`): {', '.join(self._held[:8])}"
                + (" ..." if len(self._held) > 8 else "")
            )

    def _warn_dead_layers(self, step: int) -> None:
        """Name every layer that lost all its channels (once per layer; a host read per layer, at removal or
        logging time only)."""
        for name in dead_layers(self.compressor.layers):
            if name in self._warned_dead:
                continue
            self._warned_dead.add(name)
            rank_zero_warn(
                f"SelfCompression: every channel of layer {name!r} reached 0 bits at step {step}; the layer now "
                "outputs zeros. Lower `gamma`, or use `keep_channels='all'` to keep its strongest channel alive"
            )

    def _inputs(self, pl_module: pl.LightningModule) -> Any:
        if self._example_inputs is not None:
            return self._example_inputs
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:  # kept on the CPU by Lightning: move it to the model
            from lightning.fabric.utilities.apply_func import move_data_to_device

            return move_data_to_device(example, pl_module.device)
        return None

    def _remove(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        inputs = self._inputs(pl_module)
        if inputs is None:
            if not self._warned_inputs:
                self._warned_inputs = True
                rank_zero_warn(
                    "SelfCompression: cannot remove 0-bit channels physically because no example input is known; "
                    "call `self(x)` in training_step or set `example_input_array` (the channels still output zero "
                    "and are counted as 0 bits)"
                )
            return
        optimizers = list(trainer.optimizers) + ([self.optimizer] if self.optimizer is not None else [])
        listeners = [cb for cb in trainer.callbacks if hasattr(cb, "protected_channels")]  # type: ignore[attr-defined]
        protect: dict[str, set[int]] = {}
        for cb in listeners:
            for name, idxs in cb.protected_channels().items():
                protect.setdefault(name, set()).update(idxs)
        if trainer.world_size > 1:  # rank 0 decides (on its inputs); every rank applies exactly its cuts
            report = (
                remove_dead_channels(pl_module, inputs, optimizers, protect=protect) if trainer.is_global_zero else None
            )
            report = from_rank_zero(trainer, report)
            if not trainer.is_global_zero and report.cuts:
                apply_cuts(pl_module, report.cuts, optimizers)
        else:
            report = remove_dead_channels(pl_module, inputs, optimizers, protect=protect)
        for cb in listeners:
            cb.channels_removed(report)
        removed = sum(report.removed.values())
        self.channels_removed += removed
        self.heads_removed += sum(report.heads_removed.values())
        for name, count in report.removed.items():
            self.removed_per_layer[name] = self.removed_per_layer.get(name, 0) + count
        self.idle_removed += sum(report.idle.values())
        self.last_removal = report
        if removed:
            rank_zero_info(
                f"SelfCompression: removed {removed} channels at step {trainer.global_step} "
                f"({report.params_before} -> {report.params_after} parameters)"
            )

    def log_state(self, trainer: pl.Trainer, step: int, figure: bool = False) -> dict[str, float]:
        """Log the current compression state (and return the scalars); ``figure`` adds the bit-depth heat map."""
        size = self.compressor.size()
        with torch.no_grad():
            terms = self.compressor.penalty()
        metrics = {f"compression/{k}": v for k, v in size.as_dict().items()}
        metrics["compression/q"] = float(terms.q)
        metrics["compression/penalty"] = float(terms.total)
        metrics["compression/gamma"] = self.compressor.gamma * self.compressor.gamma_scale  # during a warm-up: < γ
        metrics["compression/channels_removed"] = float(self.channels_removed)
        metrics["compression/channels_alive"] = float(sum(ls.alive_channels for ls in size.layers.values()))
        for name, ls in size.layers.items():
            metrics[f"compression/channels_alive/{name}"] = float(ls.alive_channels)
            metrics[f"compression/mean_bits/{name}"] = ls.mean_bits
        log_scalars(trainer, metrics, step)
        for name, ls in size.layers.items():
            log_histogram(trainer, f"compression/bits/{name}", ls.bits, step)
        if figure and tensorboard_writers(trainer):
            heat = {name: ls.bits.tolist() for name, ls in size.layers.items()}
            log_figure(trainer, "compression/bits_heatmap", lambda: bits_heatmap_figure(heat), step)
        return metrics

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_detection(pl_module)
        self._report_skipped(trainer)
        self._warn_dead_layers(trainer.global_step)
        if self.remove_at_fit_end:
            removed = self.channels_removed
            with on_training_device(trainer, pl_module):  # Lightning moved the model to the CPU before this hook
                self._remove(trainer, pl_module)
            if self._averaging and self.channels_removed != removed:
                refresh_averaged_copies(trainer, pl_module, "SelfCompression")
        metrics = self.log_state(trainer, trainer.global_step, figure=True)
        log_text(trainer, "compression/summary", self._summary(metrics), trainer.global_step)
        if self.export_path is not None and trainer.global_step == 0:
            rank_zero_warn("SelfCompression: no training step ran, so no packed model was written")
        elif self.export_path is not None:
            path = resolve_export_path(self.export_path, trainer)
            if trainer.is_global_zero:
                self.exported_bytes = export_compressed(pl_module, path)  # type: ignore[arg-type]
                self.exported_path = path
                rank_zero_info(f"SelfCompression: packed model written to {path} ({self.exported_bytes} bytes)")
            trainer.strategy.barrier("lightning_xai.export")  # no rank goes on before the file is complete
        plain_weights_for_spawn(trainer, pl_module)
        flush(trainer)

    def removal_stats(self) -> dict[str, Any]:
        """What became of the 0-bit channels so far: ``removed_channels`` (output channels, or attention q/k/v
        rows, removed physically), ``idle_removed`` (of those, the ones not at 0 bits whose every consumer was silent),
        ``dead_channels`` (the 0-bit ones: removed, or still in the model),
        ``heads_removed``, ``dead_heads`` (removed plus whole heads still present with every value row at 0 bits),
        ``removed_per_layer`` and, per layer that still holds 0-bit channels, their count and the reason the last
        removal gave."""
        remaining: dict[str, dict[str, Any]] = {}
        heads_left = 0
        rejected = self.last_removal.rejected if self.last_removal is not None else {}
        for layer in self.compressor.layers:
            dead = dead_channels(layer)
            if isinstance(layer.module, nn.MultiheadAttention) and layer.module.in_proj_weight is not None:
                heads_left += len(dead_heads(layer.module, set(dead)))
            if dead:
                remaining[layer.name] = {"dead": len(dead), "reason": rejected.get(layer.name, "not yet tried")}
        left = sum(r["dead"] for r in remaining.values())
        return {
            "removed_channels": self.channels_removed,
            "idle_removed": self.idle_removed,
            "dead_channels": self.channels_removed - self.idle_removed + left,
            "removed_per_layer": dict(self.removed_per_layer),
            "heads_removed": self.heads_removed,
            "dead_heads": self.heads_removed + heads_left,
            "remaining": remaining,
        }

    def _summary(self, metrics: dict[str, float]) -> str:
        size = self.compressor.size()
        lines = ["| layer | channels alive | mean bits |", "|---|---|---|"]
        lines += [f"| {n} | {ls.alive_channels} | {ls.mean_bits:.2f} |" for n, ls in size.layers.items()]
        lines.append(
            f"\nbits ratio {metrics.get('compression/bits_ratio', float('nan')):.4f}, size ratio "
            f"{metrics.get('compression/size_ratio', float('nan')):.4f}, channels removed {self.channels_removed}"
        )
        return "\n".join(lines)

    # -- checkpointing --------------------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # plain, full-size weights for `YourModule.load_from_checkpoint`; the training state rides along for resume
        # (gated batch norms under their plain keys: the gates come back from ``bn_pairs`` at fit start)
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = plain_gate_keys(checkpoint["state_dict"])
        save_plain_checkpoint(pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "compressor": self.compressor.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "bn_pairs": None if self._bn_pairs is None else [list(p) for p in self._bn_pairs],
            "channels_removed": self.channels_removed,
            "heads_removed": self.heads_removed,
            "removed_per_layer": dict(self.removed_per_layer),
            "idle_removed": self.idle_removed,
            "last_step": self._last_step,
            "held": self._held,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state_dict.get("compressor", {}))
        pairs = state_dict.get("bn_pairs")
        self._bn_pairs = None if pairs is None else [tuple(p) for p in pairs]  # type: ignore[misc]
        self.channels_removed = int(state_dict.get("channels_removed", 0))
        self.heads_removed = int(state_dict.get("heads_removed", 0))
        self.removed_per_layer = {str(k): int(v) for k, v in state_dict.get("removed_per_layer", {}).items()}
        self.idle_removed = int(state_dict.get("idle_removed", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        held = state_dict.get("held")
        self._held = None if held is None else [str(n) for n in held]
        self._pending_state = {"optimizer": state_dict.get("optimizer")}


KEEP_BITS = 2.0  # the bit depth below which a held channel is not allowed to fall


def _bits_optimizer(params: list[nn.Parameter], lr: float, eps: float) -> torch.optim.Optimizer:
    """Adam for ``b``/``e``: the fused kernel (one op for all tensors, skips itself on ``found_inf``) where the
    device has one, else the foreach implementation."""
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, ValueError, TypeError):  # pragma: no cover - devices without a fused Adam
        return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


def _scaler(trainer: pl.Trainer) -> Any:
    """The AMP grad scaler of the trainer's precision plugin (``16-mixed``), or None."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def _tell_the_scaler(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """Count non-finite ``b``/``e`` gradients as an overflow of the AMP grad scaler (device ops, no host read): the
    scaler then skips this step and lowers its scale, as it does for any other overflowing gradient of the model.

    Without this, fp16 overflows that only the ``b``/``e`` gradients see went unnoticed by the scaler, which checks
    the user's optimizer alone: the straight-through estimator zeroes the weight gradient of clipped weights, and
    ``b`` learns from exactly those (a 16-mixed run on an H200 skipped 17 to 20 of 38 bit-depth steps with the scale
    never lowered, and removed nothing, where bf16-mixed removed 28 channels). Uses the scaler's per-optimizer state
    (a private field of ``torch.amp.GradScaler``, filled by its ``unscale_`` before this hook); without it, nothing
    is told and the steps are only skipped and reported."""
    states = getattr(_scaler(trainer), "_per_optimizer_states", None)
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    per_device = state.get("found_inf_per_device") if isinstance(state, dict) else None
    if not per_device:
        return
    flag = next(iter(per_device.values()))  # the scaler adds up these flags: > 0 means overflow
    flag.add_(found_inf.to(flag.device, non_blocking=True))


def _inverse_scale(trainer: pl.Trainer, one: Tensor) -> Tensor:
    """``1 / loss scale`` of the AMP grad scaler as a device tensor (no host read), or ``one`` without a scaler."""
    scaler = _scaler(trainer)
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, Tensor):
        return scale.double().reciprocal().float().to(one.device)
    if scaler is not None and hasattr(scaler, "get_scale"):  # pragma: no cover - other scaler implementations
        return torch.full((), 1.0 / float(scaler.get_scale()), device=one.device)
    return one
