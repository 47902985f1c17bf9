"""SelfCompression on an unmodified LightningModule: it shrinks, logs, exports, resumes and validates its input."""

import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_state, quiet_trainer, state_copy
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_xai.callbacks import SelfCompression
from lightning_xai.data import DigitsDataModule
from lightning_xai.mixin import CompressionMixin
from lightning_xai.models import ImageClassifier
from lightning_xai.quantization.export import load_compressed
from lightning_xai.quantization.install import quantized_layers

_trainer = quiet_trainer


def _bits(module):
    return {q.name: q.quantizer.b.detach().clone() for q in quantized_layers(module)}


def test_unmodified_module_really_gets_smaller(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier("lenet")
    params_before = sum(p.numel() for p in model.parameters())
    export = tmp_path / "model.safetensors"
    cb = SelfCompression(gamma=0.5, remove_every_n_steps=9, log_every_n_steps=9, export_path=str(export))
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [cb], max_epochs=3, logger=logger)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    size = cb.compressor.size()
    assert size.bits_ratio < 8 / 32  # started at 8 bits
    assert cb.channels_removed > 0
    params_after = sum(p.numel() for n, p in model.named_parameters() if not n.endswith((".b", ".e")))
    assert params_after < params_before
    # the user's optimizer no longer holds b/e; the callback's Adam does
    user_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(p) in user_params for p in cb.compressor.quant_parameters())
    # export at fit end: exact reload, smaller than float32
    assert export.is_file() and cb.exported_bytes == os.path.getsize(export)
    fresh = load_compressed(export, ImageClassifier("lenet"))
    x = torch.randn(7, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    torch.save(ImageClassifier("lenet").state_dict(), tmp_path / "float.pt")
    assert os.path.getsize(export) < 0.3 * os.path.getsize(tmp_path / "float.pt")
    # scalars reached the logger
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    for tag in (
        "compression/bits_total",
        "compression/size_ratio",
        "compression/bits_ratio",
        "compression/channels_alive",
    ):
        assert tag in metrics


def test_tensorboard_gets_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    cb = SelfCompression(gamma=0.1, log_every_n_steps=5, remove_every_n_steps=0)
    trainer = _trainer(
        tmp_path, [cb], max_epochs=1, logger=TensorBoardLogger(tmp_path, name="tb"), limit_train_batches=10
    )
    trainer.fit(ImageClassifier("lenet"), DigitsDataModule())
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    acc.Reload()
    assert "compression/bits_ratio" in acc.Tags()["scalars"]
    assert "compression/bits/net.features.0.weight" in acc.Tags()["histograms"]


def test_a_layer_with_no_channels_left_is_skipped_in_the_histograms(tmp_path):
    """A layer whose channels were all removed has no bit depths to bin; TensorBoard raises on an empty histogram,
    so it is skipped (the other layers' histograms are written)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_xai.logging import log_histogram

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, [], max_epochs=1, logger=logger)
    log_histogram(trainer, "compression/bits/empty", torch.zeros(0), 3)
    log_histogram(trainer, "compression/bits/full", torch.tensor([2.0, 5.0]), 3)
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    acc.Reload()
    assert acc.Tags()["histograms"] == ["compression/bits/full"]


def test_penalty_pushes_bits_down_only_with_gamma(tmp_path):
    def run(gamma):
        pl.seed_everything(0)
        model = ImageClassifier("lenet")
        cb = SelfCompression(gamma=gamma, remove_every_n_steps=0, log_every_n_steps=0)
        _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=10).fit(model, DigitsDataModule())
        return torch.cat(list(_bits(model).values())).mean().item()

    assert run(1.0) < run(0.0) - 0.5


def test_checkpoint_resume_gives_same_bits_as_uninterrupted(tmp_path):
    kwargs = dict(
        gamma=0.5, remove_every_n_steps=7, log_every_n_steps=0, freeze_bits_after=1.0
    )  # legs differ in length

    pl.seed_everything(0)
    straight = ImageClassifier("lenet")
    cb_a = SelfCompression(**kwargs)
    _trainer(tmp_path / "a", [cb_a], max_epochs=4).fit(straight, DigitsDataModule())

    pl.seed_everything(0)
    first = ImageClassifier("lenet")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    _trainer(tmp_path / "b", [SelfCompression(**kwargs), ckpt], max_epochs=2).fit(first, DigitsDataModule())
    assert cb_a.channels_removed > 0

    pl.seed_everything(123)  # a different global seed must not matter
    resumed = ImageClassifier("lenet")  # fresh, full-size model: the checkpoint has fewer channels
    cb_b = SelfCompression(**kwargs)
    _trainer(tmp_path / "c", [cb_b, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_epochs=4).fit(
        resumed, DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    a, b = _bits(straight), _bits(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa, sb = straight.state_dict(), resumed.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    assert cb_b.channels_removed == cb_a.channels_removed


class MixinClassifier(CompressionMixin, ImageClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.compressed_loss(F.cross_entropy(self(x), y))


def test_mixin_equals_callback_alone_and_logs_terms(tmp_path):
    def run(cls, logger=False):
        pl.seed_everything(0)
        model = cls("lenet")
        cb = SelfCompression(gamma=0.3, alpha=0.01, remove_every_n_steps=0, log_every_n_steps=0)
        _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=8, logger=logger, log_every_n_steps=1).fit(
            model, DigitsDataModule()
        )
        return model

    plain = run(ImageClassifier)
    mixed = run(MixinClassifier, logger=CSVLogger(tmp_path, name="mix"))
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(mixed.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)
    text = (tmp_path / "mix" / "version_0" / "metrics.csv").read_text()
    for tag in ("compression/task_loss", "compression/q_penalty", "compression/l1_penalty", "compression/q"):
        assert tag in text


def test_mixin_without_callback_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="needs the SelfCompression callback"):
        _trainer(tmp_path, [], max_epochs=1, limit_train_batches=2).fit(MixinClassifier("lenet"), DigitsDataModule())


class _NoTaskGradient(ImageClassifier):
    """A loss whose gradient is zero everywhere: the only b-gradient left is the penalty's."""

    def training_step(self, batch, batch_idx):
        return 0.0 * self(batch[0]).sum()


class _CaptureBitGradients(pl.Callback):
    """Records the b-gradients SelfCompression's optimizer steps with (after the penalty was added)."""

    def __init__(self, sc):
        self.sc, self.grads, self.weight_grads = sc, [], []

    def on_fit_start(self, trainer, pl_module):
        step = self.sc.optimizer.step

        def recording_step(*args, **kwargs):
            layers = self.sc.compressor.layers
            self.grads.append([q.quantizer.b.grad.clone() for q in layers])
            weight_grads = [torch.zeros_like(q.original) if q.original.grad is None else q.original.grad.clone()
                            for q in layers]  # fmt: skip
            self.weight_grads.append((weight_grads, [q.original.detach().sign() for q in layers]))
            return step(*args, **kwargs)

        self.sc.optimizer.step = recording_step


@pytest.mark.parametrize("accumulate", [1, 3])
def test_penalty_gradient_is_added_once_per_optimizer_step_whatever_the_accumulation(tmp_path, accumulate):
    pl.seed_everything(0)
    model = _NoTaskGradient("lenet")
    sc = SelfCompression(gamma=0.7, remove_every_n_steps=0, log_every_n_steps=0, freeze_bits_after=1.0)
    capture = _CaptureBitGradients(sc)
    trainer = _trainer(tmp_path, [sc, capture], max_epochs=1, limit_train_batches=6, accumulate_grad_batches=accumulate)
    trainer.fit(model, DigitsDataModule())
    assert len(capture.grads) == 6 // accumulate
    n0 = sc.compressor.initial_weights
    for grads in capture.grads:
        for layer, g in zip(sc.compressor.layers, grads):
            expected = 0.7 * layer.original[0].numel() / n0 * (layer.quantizer.b.detach() > 0).float()
            torch.testing.assert_close(g, expected, rtol=1e-6, atol=0)  # γ·n_l/N0, not accumulate× that


def test_gamma_warmup_ramps_the_penalty_linearly_from_zero(tmp_path):
    """``gamma_warmup=0.5`` over 8 steps: the penalty gradients at optimizer step k are γ·min(1, k/4)·n_l/N0 on the
    bit depths and α·min(1, k/4)·sign(w)/N0 on the weights (both size pressures ramp; none at the first step), and
    the mixin's loss term uses the same ramp."""
    pl.seed_everything(0)
    model = _NoTaskGradient("lenet")
    sc = SelfCompression(
        gamma=0.7, alpha=0.3, gamma_warmup=0.5, remove_every_n_steps=0, log_every_n_steps=0, freeze_bits_after=1.0
    )
    capture = _CaptureBitGradients(sc)
    trainer = _trainer(tmp_path, [sc, capture], max_epochs=1, limit_train_batches=8)
    trainer.fit(model, DigitsDataModule())
    assert len(capture.grads) == 8
    n0 = sc.compressor.initial_weights
    for k, (grads, (weight_grads, signs)) in enumerate(zip(capture.grads, capture.weight_grads)):
        for layer, g, wg, sign in zip(sc.compressor.layers, grads, weight_grads, signs):
            alive = (layer.quantizer.b.detach() > 0).float()
            expected = 0.7 * min(1.0, k / 4) * layer.original[0].numel() / n0 * alive
            torch.testing.assert_close(g, expected, rtol=1e-6, atol=0)
            torch.testing.assert_close(wg, 0.3 * min(1.0, k / 4) * sign / n0, rtol=1e-6, atol=0)
    compressor = sc.compressor
    compressor.gamma_scale = 0.25
    terms = compressor.penalty()
    torch.testing.assert_close(terms.total, 0.25 * (0.7 * terms.q + 0.3 * terms.l1))


def test_gamma_delay_holds_the_penalty_at_zero_then_ramps(tmp_path):
    """``gamma_delay=0.25, gamma_warmup=0.25`` over 8 steps: no size pressure at steps 0-2, then γ·min(1, (k-2)/2),
    full from step 4 on; a resumed fit picks the schedule up at its step."""
    pl.seed_everything(0)
    model = _NoTaskGradient("lenet")
    sc = SelfCompression(
        gamma=0.7,
        gamma_delay=0.25,
        gamma_warmup=0.25,
        remove_every_n_steps=0,
        log_every_n_steps=0,
        freeze_bits_after=1.0,
    )
    capture = _CaptureBitGradients(sc)
    trainer = _trainer(tmp_path, [sc, capture], max_epochs=1, limit_train_batches=8)
    trainer.fit(model, DigitsDataModule())
    assert len(capture.grads) == 8
    n0 = sc.compressor.initial_weights
    for k, grads in enumerate(capture.grads):
        for layer, g in zip(sc.compressor.layers, grads):
            alive = (layer.quantizer.b.detach() > 0).float()
            expected = 0.7 * min(1.0, max(0.0, (k - 2) / 2)) * layer.original[0].numel() / n0 * alive
            torch.testing.assert_close(g, expected, rtol=1e-6, atol=0)
    sc._delay_steps, sc._warmup_steps = 2.0, 2.0
    for step, scale in ((0, 0.0), (2, 0.0), (3, 0.5), (5, 1.0)):
        sc._update_gamma_scale(step)
        assert sc.compressor.gamma_scale == scale


def test_gradient_accumulation_and_multiple_fits(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier("resnet", width=8)
    cb = SelfCompression(gamma=1.0, remove_every_n_steps=4, log_every_n_steps=0, freeze_bits_after=1.0)
    trainer = _trainer(tmp_path, [cb], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(model, DigitsDataModule())
    assert trainer.global_step == 20  # 19 batches/epoch, 2 per step (the last one alone), 2 epochs
    removed_first = cb.channels_removed
    bits_first = cb.compressor.size().quantized_weight_bits
    assert removed_first > 0
    second = _trainer(tmp_path, [cb], max_epochs=2, accumulate_grad_batches=2)  # a second fit on the same model
    second.fit(model, DigitsDataModule())
    assert len(quantized_layers(model)) == len(cb.compressor.layers)  # not installed twice
    assert cb.compressor.size().quantized_weight_bits < bits_first and cb.channels_removed >= removed_first
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all() and y.shape == (4, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": -0.1}, r"`gamma` must be >= 0.0, got -0.1"),
        ({"bits_lr": 0}, r"`bits_lr` must be > 0.0, got 0"),
        ({"bits_eps": -1.0}, r"`bits_eps` must be > 0.0, got -1.0"),
        ({"remove_every_n_steps": -5}, r"`remove_every_n_steps` must be >= 0, got -5"),
        ({"remove_every_n_steps": 2.5}, r"`remove_every_n_steps` must be an integer, got 2.5"),
        ({"log_every_n_steps": "often"}, r"`log_every_n_steps` must be an integer, got 'often'"),
        ({"remove_at_fit_end": "yes"}, r"`remove_at_fit_end` must be True or False, got 'yes'"),
        ({"export_path": 5}, r"`export_path` must be a file path \(str or os.PathLike\) or None, got 5"),
        ({"include": "["}, r"`include`='\[' is not a valid regular expression"),
        ({"init_bits": 0}, r"`init_bits` must be >= 1.0, got 0"),
    ],
)
def test_invalid_callback_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfCompression(**kwargs)


def test_state_dict_tolerates_old_checkpoints():
    cb = SelfCompression()
    cb.load_state_dict({})  # keys missing in older versions fall back to defaults
    assert cb.channels_removed == 0


def test_the_defaults_compress_digits_without_collapse(tmp_path):
    """A user who adds ``SelfCompression()`` and changes nothing: smaller, no dead layer, accuracy near float."""

    def fit(callbacks):
        pl.seed_everything(0)
        model = ImageClassifier("lenet")
        dm = DigitsDataModule(batch_size=64)
        trainer = _trainer(tmp_path, callbacks, max_epochs=6)
        trainer.fit(model, dm)
        return trainer.test(model, dm, verbose=False)[0]["test/acc"]

    float_acc = fit([])
    cb = SelfCompression(export_path=str(tmp_path / "defaults.safetensors"))
    acc = fit([cb])
    assert cb.compressor.size().bits_ratio < 0.25  # below the 8-bit start, within 6 short epochs
    assert all(bool((layer.quantizer.b > 0).any()) for layer in cb.compressor.layers)
    assert acc >= float_acc - 0.05 and acc > 0.85, (acc, float_acc)
    assert (tmp_path / "defaults.safetensors").stat().st_size < 0.3 * 4 * 89930


EMAWeightAveraging = getattr(pl.callbacks, "EMAWeightAveraging", None)  # Lightning >= 2.5


def _averaging(trainer):
    return next(cb for cb in trainer.callbacks if isinstance(cb, EMAWeightAveraging))


class _AverageAtTrainEnd(pl.Callback):
    """Records the model's tensors at ``on_train_end``, after the averaging callback (listed before it) copied the
    averaged weights back and before ``SelfCompression``'s fit-end removal."""

    def on_train_end(self, trainer, pl_module):
        self.state = state_copy(pl_module)
        self.average = state_copy(_averaging(trainer)._average_model.module)


@pytest.mark.skipif(EMAWeightAveraging is None, reason="Lightning < 2.5 has no EMAWeightAveraging")
# resnet: batch norms, whose gates SelfCompression adds later; each γ removes channels without breaking the model
@pytest.mark.parametrize("net,gamma", [("lenet", 0.1), ("resnet", 0.5)])
def test_lightning_weight_averaging_after_self_compression_trains_and_exports_the_averaged_model(tmp_path, net, gamma):
    """Lightning's EMA keeps a copy of the model and copies it back by position when training ends: removal during
    training (every 5 steps here) would change the model's shapes under it, so it waits for fit end, and the export
    holds the averaged weights. After the fit-end removal its copy is the shrunk model, so ``trainer.validate``
    (where it swaps its copy in) works."""
    pl.seed_everything(0)
    model = ImageClassifier(net)
    path = tmp_path / "m.safetensors"
    cb = SelfCompression(gamma=gamma, remove_every_n_steps=5, log_every_n_steps=0, export_path=str(path))
    probe = _AverageAtTrainEnd()
    ema = EMAWeightAveraging(decay=0.9, update_starting_at_step=46)  # from the bit depths' freeze (0.8 of 57 steps)
    dm = DigitsDataModule()
    trainer = _trainer(tmp_path, [cb, ema, probe], max_epochs=3, limit_val_batches=1.0)
    trainer.fit(model, dm)
    assert probe.state.keys() == probe.average.keys()
    for k, v in probe.average.items():  # the model trained on, replaced by its average
        assert torch.equal(probe.state[k], v), k
    assert cb.channels_removed > 0 and any(
        v.shape != model.state_dict()[k].shape for k, v in probe.state.items() if k in model.state_dict()
    )
    model.eval()
    x = torch.rand(16, 1, 8, 8)
    reloaded = load_compressed(path, ImageClassifier(net).net).eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-5)
    # the averaging callback swaps its copy in for validation, by position: it was given the shrunk model's
    (metrics,) = trainer.validate(model, dm, verbose=False)
    assert metrics["val/acc"] > 0.5  # a working model
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # validation swapped back what it swapped in


def test_weight_averaging_listed_before_self_compression_is_refused_before_the_model_changes(tmp_path):
    """Its setup would copy the model before the quantizers exist, so its average would not match the model (found
    failing when training ended, after the whole run): refused at setup, naming the order to use."""
    model = ImageClassifier("lenet")
    before = state_copy(model)
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=1e-3)
    with pytest.raises(
        ValueError, match=r"lists StochasticWeightAveraging before SelfCompression.*Put SelfCompression before it"
    ):
        _trainer(tmp_path, [swa, SelfCompression()], max_epochs=1, limit_train_batches=2).fit(model, DigitsDataModule())
    assert_same_state(model, before)


@pytest.mark.skipif(EMAWeightAveraging is None, reason="Lightning < 2.5 has no EMAWeightAveraging")
@pytest.mark.parametrize("name", ["CSWAPPruning", "AttributionPruning", "LRPCompression"])
def test_fit_end_compression_hands_weight_averaging_the_compressed_model(tmp_path, name):
    """The fit-end callbacks change the model after the averaging callback copied its average back; its copy is then
    stale, and it swaps that copy in for every later ``trainer.validate``: C-SWAP's removed channels fail on shapes,
    zeroed layers or quantized weights would silently validate the uncompressed model. Each hands it the result."""
    from lightning_xai.callbacks import AttributionPruning, CSWAPPruning, LRPCompression
    from lightning_xai.models.nets import SmallResNet

    make = {
        "CSWAPPruning": lambda: CSWAPPruning(target_ratio=0.3, samples_per_class=4, curves=("cswap",)),
        "AttributionPruning": lambda: AttributionPruning(),
        "LRPCompression": lambda: LRPCompression(prune=0.3),
    }
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = ImageClassifier(SmallResNet(1, 10, width=4))
    trainer = _trainer(tmp_path, [make[name](), EMAWeightAveraging(decay=0.9)], max_epochs=1, limit_val_batches=1.0)
    trainer.fit(model, dm)
    state = state_copy(model)
    assert_same_state(_averaging(trainer)._average_model.module, state)
    trainer.validate(model, dm, verbose=False)  # swaps the copy in and back
    assert_same_state(model, state)


def test_a_second_fit_with_a_new_callback_continues_from_the_uncompressed_counts(tmp_path):
    """Compressing further with a new SelfCompression (a new Trainer, another run) on a model an earlier run compressed
    and pruned: the new callback's N0 and float size are the original model's (before, both were 0: every channel's
    share of Q became its whole weight count, so one epoch drove the bit depths from ≈ 7.5 to ≈ 0.3, and the size
    ratios were NaN)."""
    torch.manual_seed(0)
    model = ImageClassifier("lenet")
    dm = DigitsDataModule(batch_size=64)
    first = SelfCompression(gamma=0.3, log_every_n_steps=0)
    quiet_trainer(str(tmp_path), [first], max_epochs=2).fit(model, dm)
    assert first.channels_removed > 0  # the second run starts from a smaller model
    bits_before = torch.cat([layer.quantizer.b.detach().clamp(min=0) for layer in quantized_layers(model)]).mean()
    second = SelfCompression(gamma=0.02, log_every_n_steps=0)
    quiet_trainer(str(tmp_path), [second], max_epochs=1).fit(model, dm)
    assert second.compressor.initial_weights == first.compressor.initial_weights
    assert second.compressor.float_bytes == first.compressor.float_bytes
    bits_after = torch.cat([layer.quantizer.b.detach().clamp(min=0) for layer in quantized_layers(model)]).mean()
    assert bits_after > 0.8 * bits_before  # a gentle γ stays gentle
    assert 0 < second.compressor.size().size_ratio < 1


@pytest.mark.skipif(not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler")
@pytest.mark.parametrize("cls", [ImageClassifier, MixinClassifier], ids=["callback", "mixin"])
def test_fp16_overflows_only_bits_see_lower_the_grad_scale(tmp_path, cls):
    """16-mixed with a loss scaler (as on a GPU; here fp16 autocast on the CPU with ``GradScaler("cpu")``). Clipped
    weights get a zero weight gradient from the straight-through estimator, so an fp16 overflow there reaches only
    ``b``/``e``: the scaler must hear of it and lower its scale. Before, it never did, the bit-depth step was
    skipped on half the steps for good, and nothing was removed (an H200 run: 17–20 of 38 steps skipped, 0 removed;
    bf16-mixed: 28 channels removed)."""
    from lightning.pytorch.plugins import MixedPrecision

    pl.seed_everything(0)
    model = cls("resnet", width=8)
    sc = SelfCompression(gamma=0.5, remove_every_n_steps=10, log_every_n_steps=0)
    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    quiet_trainer(tmp_path, [sc], plugins=[plugin]).fit(model, DigitsDataModule())
    assert scaler.get_scale() < 65536.0  # the overflows were heard (the first steps' overflow-free scale is 2^16)
    assert int(sc._skipped) <= 8, int(sc._skipped)  # a few steps while the scale comes down, not half of them
    assert sc.channels_removed > 0
