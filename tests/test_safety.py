"""The features that make compression safe, each with a test that fails when the feature is broken.

Every test here was checked by breaking the behaviour it guards once (see the README's testing notes): atomic
exports, batch-norm gating of dead channels, plans that leave one channel of a unit, the guard's training-split set,
targeted restoration, the end-of-training rollback, bit freezing, protection from removal, snapshot alignment, and
C-SWAP's greedy order against an independent implementation of algorithm 1.
"""

import copy
import os
import stat
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import assert_same_state, kill_channels, quiet_trainer, state_copy
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_xai import DigitsDataModule, PreservationGuard, SelfCompression
from lightning_xai.attribution.causal import CRITICAL, classify_neurons, cut_channels
from lightning_xai.models import MLP, ImageClassifier
from lightning_xai.pruning.cswap import cswap_order
from lightning_xai.pruning.surgery import remove_dead_channels
from lightning_xai.pruning.units import ChannelMasker, apply_plan, find_units, save_pruned
from lightning_xai.quantization import export as export_module
from lightning_xai.quantization.export import export_compressed
from lightning_xai.quantization.install import install_quantizers, quantized_layers
from lightning_xai.quantization.mixed import export_mixed, uniform_plan

# ---------------------------------------------------------------------------------------------------------------
# Atomic, durable, readable exports


def _partial_writer(tensors, path, *args, **kwargs):
    """A ``save_file`` that dies half-way: it writes some bytes to the path it was given, then raises."""
    with open(path, "wb") as handle:
        handle.write(b"\x00partial")
    raise OSError("disk full (simulated)")


def _writers():
    def compressed(path):
        net = nn.Linear(6, 3)
        install_quantizers(net, init_bits=4)
        return export_compressed(net, path)

    def pruned(path):
        return save_pruned(nn.Linear(6, 3), path, {})

    def mixed(path):
        net = nn.Linear(6, 3)
        return export_mixed(net, {"": uniform_plan(net.weight, 8)}, path)

    return {"export_compressed": compressed, "save_pruned": pruned, "export_mixed": mixed}


@pytest.mark.parametrize("writer", sorted(_writers()))
def test_interrupted_export_leaves_the_existing_file_byte_identical(writer, tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    _writers()[writer](target)
    before = target.read_bytes()
    monkeypatch.setattr(export_module, "save_file", _partial_writer)
    with pytest.raises(OSError, match="disk full"):
        _writers()[writer](target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary left behind


@pytest.mark.parametrize("writer", sorted(_writers()))
def test_exports_follow_the_umask_and_are_flushed_before_the_rename(writer, tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    old = os.umask(0o027)
    try:
        _writers()[writer](tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o640  # 0o666 & ~0o027, not mkstemp's 0600
    assert len(synced) >= 2  # the file, then its folder


# ---------------------------------------------------------------------------------------------------------------
# Plans that leave one channel of a unit, or none


def _mlp_and_units():
    torch.manual_seed(0)
    net = MLP(4, 3, hidden=6, depth=2).eval()
    x = torch.randn(16, 4)
    units, _ = find_units(net, x[:2])
    return net, units, x


def _masked_outputs(net, units, plan, x):
    masker = ChannelMasker(net, units)
    by_name = {u.name: u for u in units}
    for name, chs in plan.items():
        masker.remove(by_name[name].index, chs)
    with torch.no_grad(), masker.active():
        return net(x)


def test_a_plan_that_leaves_one_channel_keeps_it_alive():
    net, units, x = _mlp_and_units()
    unit = units[-1]  # the first hidden layer (units run from the output towards the input)
    plan = {unit.name: list(range(unit.size - 1))}  # all but the last channel
    expected = _masked_outputs(net, units, plan, x)
    apply_plan(net, units, plan, x[:2])
    layer = net.get_submodule(unit.name)
    assert layer.out_features == 1
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    consumer = net.get_submodule(unit.consumers[0])
    assert consumer.weight.abs().sum() > 0  # the surviving channel still feeds its consumer


def test_a_plan_that_removes_every_channel_keeps_one_zeroed():
    net, units, x = _mlp_and_units()
    unit = units[-1]
    plan = {unit.name: list(range(unit.size))}
    expected = _masked_outputs(net, units, plan, x)
    apply_plan(net, units, plan, x[:2])
    assert net.get_submodule(unit.name).out_features == 1  # shapes stay valid
    assert torch.equal(
        net.get_submodule(unit.consumers[0]).weight, torch.zeros_like(net.get_submodule(unit.consumers[0]).weight)
    )
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# PreservationGuard


def _trained(epochs=4, seed=0):
    pl.seed_everything(seed)
    model = ImageClassifier("lenet")
    quiet_trainer(tempfile.mkdtemp(), [], max_epochs=epochs).fit(model, DigitsDataModule())
    return model


def test_the_set_indexes_the_training_split_with_the_documented_size():
    dm = DigitsDataModule()
    guard = PreservationGuard(fraction=0.1, lam=0.0, check_every_n_steps=1000)
    quiet_trainer(tempfile.mkdtemp(), [guard], max_epochs=1, limit_train_batches=2).fit(ImageClassifier("lenet"), dm)
    train_x, train_y = dm.dataset("train").tensors
    n_train = len(train_y)
    assert len(guard.indices) == round(0.1 * n_train)  # `fraction` of the training samples
    assert len(set(guard.indices.tolist())) == len(guard.indices) and guard.indices.max() < n_train
    x, y = guard._data
    assert torch.equal(x, train_x[guard.indices]) and torch.equal(y, train_y[guard.indices])  # training data
    global_ids = dm.indices["train"][guard.indices]
    assert not set(global_ids.tolist()) & set(dm.indices["val"].tolist())  # never a validation sample
    assert not set(global_ids.tolist()) & set(dm.indices["test"].tolist())
    counts = np.bincount(y.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 1  # class-balanced


def test_restoration_touches_only_channels_that_lost_bits():
    net = ImageClassifier("lenet")
    sc = SelfCompression(gamma=0.1)
    sc.compressor.install(net)
    guard = PreservationGuard(cooldown_steps=0)
    guard.snapshot = guard._current(net)
    layer = quantized_layers(net)[1]
    with torch.no_grad():
        layer.quantizer.b[:4] = torch.tensor([3.0, 9.5, 12.0, 0.0])  # lost, gained, gained, lost
        layer.quantizer.e[:4] += 1.0
    before_b = layer.quantizer.b.detach().clone()
    before_e = layer.quantizer.e.detach().clone()
    guard.threshold = 0.5
    guard._data = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    guard._restore(_Trainer(sc), net, 0.1)
    b_snap, e_snap = guard.snapshot[layer.qualified]
    b, e = layer.quantizer.b.detach(), layer.quantizer.e.detach()
    assert torch.equal(b[[0, 3]], b_snap[[0, 3]]) and torch.equal(e[[0, 3]], e_snap[[0, 3]])  # restored
    assert torch.equal(b[[1, 2]], before_b[[1, 2]]) and torch.equal(e[[1, 2]], before_e[[1, 2]])  # left as they were
    assert torch.equal(b[4:], before_b[4:])
    assert guard.restorations[-1]["channels"] == 2


class _Trainer:
    """What ``PreservationGuard._restore`` reads from a Trainer."""

    def __init__(self, *callbacks):
        self.callbacks = list(callbacks)
        self.global_step = 7
        self.loggers = []
        self.is_global_zero = True


class _Wreck(pl.Callback):
    """Destroys the model at train end, before the guard's own check (it sits before the guard in the list)."""

    def __init__(self, guard):
        self.guard = guard
        self.healthy = None

    def on_train_end(self, trainer, pl_module):
        if self.guard._healthy_state is not None:
            self.healthy = {k: v.clone() for k, v in self.guard._healthy_state.items()}
        with torch.no_grad():
            for p in pl_module.parameters():
                p.mul_(-1.0)


@pytest.mark.parametrize("rollback", [True, False])
def test_forced_end_of_training_rollback(rollback, tmp_path):
    model = _trained()
    guard = PreservationGuard(fraction=0.1, lam=0.0, check_every_n_steps=5, max_drop=0.05, rollback_at_end=rollback)
    wreck = _Wreck(guard)
    logger = CSVLogger(tmp_path, name="log")
    trainer = quiet_trainer(tmp_path, [wreck, guard], max_epochs=1, logger=logger)
    trainer.fit(model, DigitsDataModule())
    if rollback:
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in wreck.healthy.items())  # the last healthy model, exactly
        assert guard.rolled_back and guard.restorations[-1].get("rollback") is True
        assert guard.last_accuracy >= guard.threshold
        metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
        assert "preservation/rollback" in metrics
    else:
        assert not guard.rolled_back
        assert not any(r.get("rollback") for r in guard.restorations)
        assert guard.last_accuracy < guard.threshold  # the wrecked model is what you get


_EMA = getattr(pl.callbacks, "EMAWeightAveraging", None)  # Lightning >= 2.5


@pytest.mark.skipif(_EMA is None, reason="Lightning < 2.5 has no EMAWeightAveraging")
def test_a_rollback_after_weight_averaging_is_what_the_averaging_callback_holds_afterwards(tmp_path):
    """The averaging callback copies its average into the model when training ends; the guard, listed after it,
    judges that model and rolls it back, then hands the callback the rolled-back model (which it swaps in for every
    later ``trainer.validate``)."""
    model = _trained()
    guard = PreservationGuard(fraction=0.1, lam=0.0, check_every_n_steps=5, max_drop=0.05)
    ema = _EMA(decay=0.9)
    wreck = _Wreck(guard)
    quiet_trainer(tmp_path, [ema, wreck, guard], max_epochs=1).fit(model, DigitsDataModule())
    assert guard.rolled_back
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in wreck.healthy.items())
    assert_same_state(ema._average_model.module, state_copy(model))


def test_weight_averaging_listed_after_the_guard_is_refused(tmp_path):
    """It would copy its average into the model after the guard's train-end check, replacing what the guard judged
    (or rolled back): refused at setup, naming the order to use."""
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=1e-3)
    guard = PreservationGuard(fraction=0.1)
    with pytest.raises(
        ValueError, match=r"lists StochasticWeightAveraging after PreservationGuard.*Put PreservationGuard after"
    ):
        quiet_trainer(tmp_path, [guard, swa], max_epochs=1).fit(ImageClassifier("lenet"), DigitsDataModule())


def test_freeze_bits_after_half_of_the_steps_stops_b_and_e():
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(torch.cat([p.detach().clone().flatten() for p in sc.compressor.quant_parameters()]))

    pl.seed_everything(0)
    sc = SelfCompression(gamma=0.5, freeze_bits_after=0.5, remove_every_n_steps=0, log_every_n_steps=0)
    trainer = quiet_trainer(tempfile.mkdtemp(), [sc, Record()], max_epochs=1, limit_train_batches=10)
    trainer.fit(ImageClassifier("lenet"), DigitsDataModule())
    changes = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert all(changes[:4]) and not any(changes[5:])  # steps 1..5 move b/e; from step 6 (half of 10) they stay
    assert sc.frozen


def test_a_protected_channel_survives_removal_and_can_be_restored():
    torch.manual_seed(0)
    net = ImageClassifier("lenet")
    sc = SelfCompression(gamma=0.1)
    sc.compressor.install(net)
    guard = PreservationGuard(cooldown_steps=0)
    guard.snapshot = guard._current(net)  # everything alive: every channel is protected
    layer = quantized_layers(net)[0]
    kill_channels(layer, [2, 5])
    report = remove_dead_channels(net, torch.randn(4, 1, 8, 8), protect=guard.protected_channels())
    guard.channels_removed(report)
    assert layer.quantizer.b.shape[0] == 32 and not report.removed.get(layer.name)
    guard.threshold = 0.5
    guard._data = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    guard._restore(_Trainer(sc), net, 0.1)
    assert bool((layer.quantizer.b[[2, 5]] > 0).all())  # back alive


def test_the_snapshot_shrinks_with_removals_and_a_later_restore_still_works():
    torch.manual_seed(0)
    net = ImageClassifier("lenet")
    sc = SelfCompression(gamma=0.1)
    sc.compressor.install(net)
    guard = PreservationGuard(cooldown_steps=0)
    layer = quantized_layers(net)[0]
    kill_channels(layer, [0, 1, 2])
    guard.snapshot = guard._current(net)  # channels 0-2 dead in the snapshot too: not protected
    report = remove_dead_channels(net, torch.randn(4, 1, 8, 8), protect=guard.protected_channels())
    assert report.removed[layer.name] == 3
    stale = copy.deepcopy(guard.snapshot)
    guard.channels_removed(report)
    b_snap, _ = guard.snapshot[layer.qualified]
    assert b_snap.shape[0] == layer.quantizer.b.shape[0] == 29
    kill_channels(layer, [4])
    guard.threshold = 0.5
    guard._data = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    guard._restore(_Trainer(sc), net, 0.1)
    assert float(layer.quantizer.b[4]) == float(b_snap[4]) > 0
    guard.snapshot = stale  # a snapshot nobody re-aligned is an error, not a silent skip
    kill_channels(layer, [4])
    with pytest.raises(RuntimeError, match="snapshot of 'net.features.0.weight' has 32 channels but the layer has 29"):
        guard._restore(_Trainer(sc), net, 0.1)


# ---------------------------------------------------------------------------------------------------------------
# C-SWAP's greedy order (algorithm 1) against an independent implementation


def _naive_algorithm_1(net, units, x, y, alpha=0.05):
    """Algorithm 1 written out with plain loops: units output→input, neurons by ascending magnitude, each cut on top of
    the removals so far against the *current* network's σ; non-critical ones removed at once; the critical ones
    afterwards by ξ from the closest to zero to the most negative."""

    def sigma(cuts):
        with torch.no_grad(), _cuts(net, units, cuts):
            return torch.softmax(net(x).double(), 1).gather(1, y[:, None]).squeeze(1)

    removed, critical = [], []
    for unit in units:
        for c in torch.argsort(unit.magnitude, stable=True).tolist():
            base = sigma(removed)
            star = sigma(removed + [(unit.index, c)])
            v = classify_neurons(base, star[None], y, alpha)
            if bool(v.significant[0].any()) and float(v.xi[0]) <= 0:
                critical.append((float(v.xi[0]), (unit.index, c)))
            else:
                removed.append((unit.index, c))
    critical.sort(key=lambda t: -t[0])
    return removed + [n for _, n in critical], len(removed)


class _cuts:
    def __init__(self, net, units, neurons):
        self.stack = []
        self.items = []
        for u, c in neurons:
            for name, idxs in units[u].consumer_inputs(c).items():
                self.items.append((net.get_submodule(name), idxs))

    def __enter__(self):
        for module, idxs in self.items:
            ctx = cut_channels([module], list(idxs))
            ctx.__enter__()
            self.stack.append(ctx)

    def __exit__(self, *exc):
        for ctx in reversed(self.stack):
            ctx.__exit__(*exc)


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_cswap_order_equals_an_independent_algorithm_1(mode):
    pl.seed_everything(3)
    model = ImageClassifier(MLP(64, 10, hidden=12, depth=2))
    quiet_trainer(tempfile.mkdtemp(), [], max_epochs=3).fit(model, DigitsDataModule(flatten=True))
    net = model.net.eval()
    x, y = DigitsDataModule(flatten=True).dataset("val").tensors
    x, y = x[:120], y[:120]
    units, _ = find_units(net, x[:2])
    expected, non_critical = _naive_algorithm_1(net, units, x, y)
    got = cswap_order(net, units, x, y, mode=mode)
    assert got.non_critical == non_critical and 0 < non_critical < len(expected)
    assert got.order == expected
    tail = [float(got.xi[u][c]) for u, c in got.order[non_critical:]]
    assert tail == sorted(tail, reverse=True)  # ξ closest to zero first


def test_removing_one_neuron_changes_the_verdict_on_its_redundant_twin():
    """Hand-built: two identical hidden neurons ``a = b = x ≥ 1`` feed ``s = a + b``, clipped to ``d = min(s, 1)``
    (a Hardtanh, which nothing can prune). Cutting either twin alone changes nothing (neutral), but once one is
    removed the other is all that is left: cutting it now sends ``d`` to 0 (critical). Algorithm 1 must remove exactly
    one twin and keep the other as critical."""
    lin1, lin_s, head = nn.Linear(1, 2), nn.Linear(2, 1), nn.Linear(1, 2)
    with torch.no_grad():
        lin1.weight.fill_(1.0)
        lin1.bias.zero_()
        lin_s.weight.fill_(1.0)
        lin_s.bias.zero_()
        head.weight.copy_(torch.tensor([[-3.0], [3.0]]))
        head.bias.zero_()
    net = nn.Sequential(lin1, nn.ReLU(), lin_s, nn.Hardtanh(0.0, 1.0), head).eval()
    x = 1.0 + torch.rand(40, 1)
    y = torch.ones(40, dtype=torch.long)
    units, _ = find_units(net, x[:2])
    twins = next(u for u in units if u.name == "0")
    for mode in ("reference", "fast"):
        order = cswap_order(net, units, x, y, mode=mode)
        removed = [n for n in order.order[: order.non_critical] if n[0] == twins.index]
        assert removed == [(twins.index, 0)], mode  # the first twin goes (ascending magnitude, ties by index)
        assert int(order.category[twins.index][1]) == CRITICAL, mode  # and that makes the second one critical


def test_the_baseline_follows_each_removal():
    """Hand-built: in one unit, neuron A (smaller weights, analysed first) hurts the true class twice as much as
    neuron B helps it. Cutting A raises σ (detrimental: removed). Against the network *without A*, cutting B lowers σ
    (critical: kept) — but against the stale original σ it would look detrimental and be removed too."""
    lin1, head = nn.Linear(1, 2), nn.Linear(2, 2)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[0.5], [1.0]]))  # a = x/2, b = x
        lin1.bias.zero_()
        head.weight.copy_(torch.tensor([[0.0, 0.0], [-4.0, 1.0]]))  # true-class logit = -4a + b = -x
        head.bias.zero_()
    net = nn.Sequential(lin1, nn.ReLU(), head).eval()
    x = 0.5 + torch.rand(40, 1)
    y = torch.ones(40, dtype=torch.long)
    units, _ = find_units(net, x[:2])
    (unit,) = units
    for mode in ("reference", "fast"):
        order = cswap_order(net, units, x, y, mode=mode)
        assert order.order[: order.non_critical] == [(unit.index, 0)], mode  # A removed
        assert int(order.category[unit.index][1]) == CRITICAL, mode  # B kept: judged against the network without A


def _guarded_lenet(restored_penalty: float):
    """A LeNet under SelfCompression and a guard whose healthy snapshot is the 8-bit start (no training)."""
    net = ImageClassifier("lenet")
    sc = SelfCompression(gamma=0.1)
    sc.compressor.install(net)
    guard = PreservationGuard(cooldown_steps=0, restored_penalty=restored_penalty)
    guard.snapshot = guard._current(net)
    guard.threshold = 0.5
    guard._data = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    return net, sc, guard, quantized_layers(net)[1]


def _penalty_gradient(net, sc, layer):
    """The size penalty's gradient on ``layer``'s bit depths alone."""
    for q in quantized_layers(net):
        q.quantizer.b.grad = None
    sc.compressor.add_penalty_gradients()
    return layer.quantizer.b.grad


def test_restored_channels_are_relieved_of_the_size_penalty():
    """After a restoration the size penalty no longer pushes the restored channels back down (it did, and the guard
    restored the same channels again and again); the others keep the full pressure."""
    net, sc, guard, layer = _guarded_lenet(restored_penalty=0.0)
    kill_channels(layer, [3, 7])
    guard._restore(_Trainer(sc), net, 0.1)
    grad = _penalty_gradient(net, sc, layer)
    assert float(grad[3]) == float(grad[7]) == 0.0
    assert bool((grad[[0, 1, 2, 4, 5, 6]] > 0).all())
    assert sc.compressor.layers[1].quantizer.relief.tolist()[3] == 0.0  # in the state dict: survives a resume


def test_each_restoration_multiplies_the_restored_channels_penalty_by_restored_penalty():
    """``restored_penalty=0.5``: a channel restored once feels half the size penalty, restored twice a quarter (so the
    guard converges without freezing a channel at its restored precision for good); untouched channels feel it all."""
    net, sc, guard, layer = _guarded_lenet(restored_penalty=0.5)
    kill_channels(layer, [3, 7])
    guard._restore(_Trainer(sc), net, 0.1)
    kill_channels(layer, [3])
    guard._restore(_Trainer(sc), net, 0.1)
    assert layer.quantizer.relief.tolist()[:8] == [1.0, 1.0, 1.0, 0.25, 1.0, 1.0, 1.0, 0.5]
    grad = _penalty_gradient(net, sc, layer)
    torch.testing.assert_close(grad[3], 0.25 * grad[0])
    torch.testing.assert_close(grad[7], 0.5 * grad[0])
