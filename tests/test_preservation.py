"""Preservation selectors against independent references; the set never leaves the training split; the guard."""

import csv
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from sklearn.cluster import KMeans
from torch import nn

from lightning_xai.callbacks import PreservationGuard, SelfCompression
from lightning_xai.callbacks.preservation_guard import restore_lost_bits
from lightning_xai.data import DigitsDataModule, NamesDataModule
from lightning_xai.models import ImageClassifier
from lightning_xai.models.char_transformer import CharTransformer
from lightning_xai.preservation import (
    build_preservation_set,
    gradcam_scores,
    gradient_embedding_scores,
    kmeans_representatives,
    penultimate_embeddings,
    uncertainty_scores,
)
from lightning_xai.quantization.install import quantized_layers


def test_uncertainty_scores_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.1], [0.0, 0.0, 0.0], [5.0, -1.0, 4.9]])
    p = torch.softmax(logits.double(), 1)
    for i in range(3):
        row = sorted(p[i].tolist(), reverse=True)
        ent = -sum(v * np.log(v) for v in p[i].tolist())
        assert uncertainty_scores(logits, "entropy")[i].item() == pytest.approx(ent, rel=1e-6)
        assert uncertainty_scores(logits, "least_confidence")[i].item() == pytest.approx(1 - row[0], rel=1e-6)
        assert uncertainty_scores(logits, "margin")[i].item() == pytest.approx(1 - (row[0] - row[1]), rel=1e-6)
    with pytest.raises(ValueError, match=r"`kind` must be one of \['least_confidence', 'margin', 'entropy'\]"):
        uncertainty_scores(logits, "variance")


def test_kmeans_picks_are_nearest_to_sklearn_centroids():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.3, size=(30, 2)) for c in ((0, 0), (4, 0), (0, 4), (4, 4))])
    picks = kmeans_representatives(x, 4, seed=0)
    centers = KMeans(n_clusters=4, random_state=0, n_init=4).fit(x).cluster_centers_
    nearest = {int(np.argmin(((x - c) ** 2).sum(1))) for c in centers}
    assert set(picks.tolist()) == nearest
    assert len(set(picks.tolist())) == 4


class _BrightSpot(nn.Module):
    """Class 1 evidence = sum of a 'bright pixel' detector; class 0 is a constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[0.0], [1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).sum((2, 3)))


def test_gradcam_ranks_the_obviously_salient_sample_first():
    x = torch.full((5, 1, 6, 6), 0.01)
    x[3, 0, 2:4, 2:4] = 5.0
    net = _BrightSpot()
    net.train()
    scores = gradcam_scores(net, x, torch.ones(5, dtype=torch.long), target_layer=net.conv)
    assert int(scores.argmax()) == 3
    assert net.training  # grad-cam's eval() was undone
    assert not net.conv._forward_hooks and not net.conv._backward_hooks
    assert all(p.grad is None for p in net.parameters())


def test_gradcam_releases_hooks_on_exception():
    net = _BrightSpot()
    with pytest.raises(IndexError):
        gradcam_scores(net, torch.zeros(2, 1, 6, 6), torch.tensor([0, 7]), target_layer=net.conv)  # bad target
    assert not net.conv._forward_hooks and not net.conv._backward_hooks and not net.conv._forward_pre_hooks


def test_gradient_embedding_matches_autograd_by_hand():
    torch.manual_seed(0)
    net = CharTransformer(num_classes=3, dim=16, heads=2, depth=1, max_len=6).double()
    tokens = torch.randint(1, 27, (4, 6))
    labels = torch.tensor([0, 1, 2, 1])
    got = gradient_embedding_scores(net, tokens, labels)
    net.eval()
    for i in range(4):
        emb = net.embed(tokens[i : i + 1]).detach().requires_grad_()
        # re-run the forward with the embedding output replaced
        handle = net.embed.register_forward_hook(lambda m, a, o, e=emb: e)
        out = net(tokens[i : i + 1])[0, labels[i]]
        handle.remove()
        (g,) = torch.autograd.grad(out, emb)
        assert got[i].item() == pytest.approx((g * emb).abs().sum().item(), rel=1e-6)


def test_penultimate_embeddings_are_the_head_input():
    net = ImageClassifier("lenet").net
    x = torch.randn(3, 1, 8, 8)
    feats, logits = penultimate_embeddings(net, x)
    assert feats.shape == (3, 128)
    torch.testing.assert_close(net.classifier[3](feats), logits)


class _AuxHeads(nn.Module):
    """A classifier that registers an auxiliary Linear after its head and calls a side Linear (another width) after
    the head: the head is still the Linear whose output width is the class count."""

    def __init__(self, call_side: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.side = nn.Linear(16, 5)  # registered last
        self.call_side = call_side

    def forward(self, x):
        h = self.body(x)
        logits = self.head(h)
        if self.call_side:
            self.aux = self.side(h)
        return logits


@pytest.mark.parametrize("call_side", [False, True], ids=["unused_aux_head", "side_head_called_last"])
def test_penultimate_embeddings_find_the_head_among_other_linears(call_side):
    """Before, the last *registered* Linear was taken: unused, it left nothing to read (``torch.cat(): expected a
    non-empty list``, the guard failed when training started)."""
    torch.manual_seed(0)
    net = _AuxHeads(call_side)
    x = torch.randn(5, 1, 8, 8)
    feats, logits = penultimate_embeddings(net, x)
    torch.testing.assert_close(feats, net.body(x))
    torch.testing.assert_close(net.head(feats), logits)


def test_penultimate_embeddings_refuse_a_model_that_calls_no_linear():
    net = _AuxHeads(call_side=False)
    net.forward = lambda x: net.body[0](x)[:, :3]  # calls no Linear at all
    with pytest.raises(ValueError, match=r"none of the 3 Linear layer\(s\) of _AuxHeads was called"):
        penultimate_embeddings(net, torch.randn(2, 1, 8, 8))


def test_set_is_class_balanced_reproducible_and_training_only():
    dm = DigitsDataModule(seed=0)
    dm.setup()
    x, y = dm.dataset("train").tensors
    net = ImageClassifier("lenet").net
    a = build_preservation_set(net, x, y, fraction=0.1, seed=3)
    b = build_preservation_set(net, x, y, fraction=0.1, seed=3)
    assert np.array_equal(a.indices, b.indices)
    assert len(a) == round(0.1 * len(y)) and len(set(a.indices.tolist())) == len(a)
    counts = np.bincount(y[a.indices].numpy(), minlength=10)
    assert counts.max() - counts.min() <= 1
    assert {"gradcam", "uncertainty", "diversity"} <= set(a.reasons.values())
    original = dm.indices["train"][a.indices]  # back to indices of the full digits set
    assert not set(original.tolist()) & set(dm.indices["val"].tolist())
    assert not set(original.tolist()) & set(dm.indices["test"].tolist())


def test_restore_lost_bits_rule():
    snap = {"a.weight": (torch.tensor([4.0, 3.0, 2.0]), torch.zeros(3))}
    now = {"a.weight": (torch.tensor([4.0, 1.0, 2.5]), torch.zeros(3))}
    lost = restore_lost_bits(now, snap)
    assert lost["a.weight"].tolist() == [False, True, False]


def _trainer(tmp_path, callbacks, epochs=2, **kw):
    return quiet_trainer(tmp_path, callbacks, max_epochs=epochs, **kw)


def test_guard_restores_exactly_the_snapshot_bits(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier("lenet")
    _trainer(tmp_path, [], epochs=3).fit(model, DigitsDataModule())
    sc = SelfCompression(gamma=2.0, remove_every_n_steps=0, log_every_n_steps=0)
    guard = PreservationGuard(fraction=0.1, lam=0.0, check_every_n_steps=1000, min_accuracy=0.5)
    _trainer(tmp_path, [sc, guard], epochs=1, limit_train_batches=1).fit(model, DigitsDataModule())
    snapshot = {k: (b.clone(), e.clone()) for k, (b, e) in guard.snapshot.items()}
    layers = quantized_layers(model)
    with torch.no_grad():  # destroy precision in two layers
        layers[1].quantizer.b[:40] = 0.0
        layers[3].quantizer.b[:100] = 0.0
    guard.threshold = 1.01  # force "unhealthy"

    class T:  # the parts of a trainer that check() uses
        global_step = 7
        callbacks = [sc]
        loggers = []

    guard.check(T, model)
    assert len(guard.restorations) == 1
    ev = guard.restorations[0]
    assert ev["layers"] == ["net.classifier.1.weight", "net.features.2.weight"]
    assert ev["channels"] == 140
    for q in quantized_layers(model):
        b0, e0 = snapshot[q.qualified]
        assert torch.equal(q.quantizer.b, b0) and torch.equal(q.quantizer.e, e0)


def test_guard_prevents_collapse_and_logs(tmp_path):
    pl.seed_everything(0)
    base = ImageClassifier("lenet")
    _trainer(tmp_path, [], epochs=5).fit(base, DigitsDataModule())
    import copy

    def run(with_guard):
        pl.seed_everything(0)
        m = copy.deepcopy(base)
        sc = SelfCompression(gamma=1.0, remove_every_n_steps=20, log_every_n_steps=0)
        guard = PreservationGuard(fraction=0.1, lam=0.5, check_every_n_steps=5, max_drop=0.02)
        logger = CSVLogger(tmp_path, name="guard" if with_guard else "plain")
        trainer = _trainer(tmp_path, [sc] + ([guard] if with_guard else []), epochs=3, logger=logger)
        trainer.fit(m, DigitsDataModule())
        return trainer.test(m, DigitsDataModule(), verbose=False)[0]["test/acc"], guard, logger

    unsafe, _, _ = run(False)
    safe, guard, logger = run(True)
    assert guard.restorations, "aggressive gamma should trigger at least one restoration"
    assert guard.last_accuracy >= guard.threshold
    assert safe >= unsafe
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"preservation/accuracy", "preservation/threshold", "compression/restorations"} <= logged
    assert {"preservation/restored_channels", "preservation/restored_bits"} <= logged
    restorations = [float(r["compression/restorations"]) for r in rows if r.get("compression/restorations")]
    assert restorations[-1] == len(guard.restorations) and restorations == sorted(restorations)
    accuracies = [float(r["preservation/accuracy"]) for r in rows if r.get("preservation/accuracy")]
    assert len(accuracies) >= 3 * 19 // 5 - 1  # one per check


def test_guard_resume_round_trip(tmp_path):
    def fit(callbacks, epochs, ckpt=None, model=None):
        m = model or ImageClassifier("lenet")
        _trainer(tmp_path, callbacks, epochs=epochs).fit(m, DigitsDataModule(), ckpt_path=ckpt)
        return m

    kwargs = dict(fraction=0.1, lam=0.3, check_every_n_steps=4, min_accuracy=0.2)
    pl.seed_everything(0)
    g_a = PreservationGuard(**kwargs)
    a = fit([SelfCompression(gamma=0.5, remove_every_n_steps=6, log_every_n_steps=0, freeze_bits_after=1.0), g_a], 4)
    pl.seed_everything(0)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    g_first = PreservationGuard(**kwargs)
    fit(
        [SelfCompression(gamma=0.5, remove_every_n_steps=6, log_every_n_steps=0, freeze_bits_after=1.0), g_first, ck], 2
    )
    pl.seed_everything(7)
    g_b = PreservationGuard(**kwargs)
    b = fit(
        [
            SelfCompression(gamma=0.5, remove_every_n_steps=6, log_every_n_steps=0, freeze_bits_after=1.0),
            g_b,
            ModelCheckpoint(dirpath=tmp_path / "c2"),
        ],
        4,
        ckpt=str(tmp_path / "ck" / "last.ckpt"),
    )
    assert np.array_equal(g_a.indices, g_b.indices)
    assert g_a.restorations == g_b.restorations
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_names_data_and_char_model():
    for task, classes in (("first_vs_last", 2), ("three_way", 3)):
        dm = NamesDataModule(seed=0, task=task)
        dm.setup()
        x, y = dm.dataset("train").tensors
        assert x.dtype == torch.long and x.shape[1] == 12 and set(y.tolist()) == set(range(classes))
        counts = torch.bincount(y)
        assert counts.max() - counts.min() <= 2
        assert len(set(dm.words)) == len(dm.words)  # ambiguous names were dropped
    assert len(NamesDataModule(task="first_vs_last").dataset("train")) > 4000
    with pytest.raises(ValueError, match=r"`task` must be one of \['first_vs_last', 'three_way'\], got 'origin'"):
        NamesDataModule(task="origin")
    net = CharTransformer(num_classes=3, max_len=12)
    layers = [(q.name, q.tensor) for q in __import__("lightning_xai").quantization.install.install_quantizers(net)]
    assert ("blocks.0.attn", "in_proj_weight") in layers and ("blocks.1.mlp.2", "weight") in layers
    assert net(x[:5]).shape == (5, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, r"`fraction` must be > 0.0, got 0.0"),
        ({"fraction": 1.5}, r"`fraction` must be <= 1.0, got 1.5"),
        ({"lam": -1}, r"`lam` must be >= 0.0, got -1"),
        ({"check_every_n_steps": 0}, r"`check_every_n_steps` must be >= 1, got 0"),
        ({"min_accuracy": 0.9, "max_drop": 0.1}, r"give either `min_accuracy` or `max_drop`, not both"),
        ({"min_accuracy": 2.0}, r"`min_accuracy` must be <= 1.0, got 2.0"),
        ({"uncertainty": "bald"}, r"`uncertainty` must be one of \['least_confidence', 'margin', 'entropy'\]"),
        ({"indices": []}, r"`indices` must be a non-empty list"),
        ({"cooldown_steps": -2}, r"`cooldown_steps` must be >= 0, got -2"),
    ],
)
def test_invalid_guard_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreservationGuard(**kwargs)


def test_guard_works_with_the_mixin(tmp_path):
    """With the penalty written in the user's loss (the mixin), an aggressive γ still triggers restorations and the
    guard keeps the preservation accuracy at its threshold."""
    from test_callback import MixinClassifier

    pl.seed_everything(0)
    base = ImageClassifier("lenet")
    _trainer(tmp_path, [], epochs=4).fit(base, DigitsDataModule())  # a plain float model first
    model = MixinClassifier("lenet")
    model.load_state_dict(base.state_dict())
    guard = PreservationGuard(fraction=0.1, lam=0.2, check_every_n_steps=3, max_drop=0.02)
    sc = SelfCompression(gamma=3.0, remove_every_n_steps=0, log_every_n_steps=0)
    _trainer(tmp_path, [sc, guard], epochs=2).fit(model, DigitsDataModule())
    assert model._lxai_penalty_step >= 0  # the penalty came through the mixin's loss
    assert guard.restorations, "γ=3 collapses the model without restorations"
    assert guard.last_accuracy >= guard.threshold


def test_a_failing_restoration_leaves_bits_exponents_and_optimizer_untouched(monkeypatch):
    from types import SimpleNamespace

    from lightning_xai.quantization.install import install_quantizers

    net = ImageClassifier("lenet")
    layers = install_quantizers(net)
    opt = torch.optim.Adam([p for q in layers for p in (q.quantizer.b, q.quantizer.e)], lr=0.5)
    for q in layers:  # give Adam some moments to protect
        (q.quantizer.b.sum() + q.quantizer.e.sum()).backward()
    opt.step()
    guard = PreservationGuard(fraction=0.1, cooldown_steps=5)
    guard.snapshot = guard._current(net)
    with torch.no_grad():
        layers[0].quantizer.b[:3] -= 2.0  # bits lost since the snapshot
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
    sc = SimpleNamespace(optimizer=opt)
    monkeypatch.setattr("lightning_xai.callbacks.self_compression.SelfCompression", SimpleNamespace)
    trainer = SimpleNamespace(callbacks=[sc], global_step=7)

    def boom(model):
        raise RuntimeError("accuracy failed mid-restoration")

    monkeypatch.setattr(guard, "accuracy", boom)
    with pytest.raises(RuntimeError, match="mid-restoration"):
        guard._restore(trainer, net, 0.5)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for p, s in opt.state.items():
        assert all(torch.equal(moments[id(p)][k], v) for k, v in s.items() if torch.is_tensor(v))
    assert guard._frozen == {} and guard._frozen_until == -1 and guard.restorations == []


def test_target_layer_names_the_gradcam_layer_and_typos_are_refused(tmp_path):
    def selected(target):
        pl.seed_everything(0)
        model = ImageClassifier("lenet")
        guard = PreservationGuard(fraction=0.1, check_every_n_steps=50, target_layer=target)
        _trainer(tmp_path, [guard], epochs=1).fit(model, DigitsDataModule())
        return guard.indices.tolist()

    default = selected(None)
    assert selected("net.features.5") == default  # the last conv is the default target
    assert selected("net.features.0") != default  # another layer, other evidence, another set
    with pytest.raises(ValueError, match=r"`target_layer` names layers.*'net\.feature\.0' \(did you mean"):
        selected("net.feature.0")
    with pytest.raises(ValueError, match="`target_layer` must be a module name"):
        PreservationGuard(target_layer=nn.Conv2d(1, 1, 1))


def test_guard_reads_dict_samples_and_refuses_sequence_labels():
    from torch.utils.data import Dataset

    from lightning_xai._datasets import dataset_inputs, dataset_labels

    class Dicts(Dataset):
        def __init__(self, label_shape=()):
            self.shape = label_shape

        def __len__(self):
            return 6

        def __getitem__(self, i):
            label = torch.full(self.shape, i % 3) if self.shape else i % 3
            return {"pixel_values": torch.full((2,), float(i)), "labels": label}

    assert dataset_labels(Dicts()).tolist() == [0, 1, 2, 0, 1, 2]
    assert dataset_inputs(Dicts(), [4, 1])[:, 0].tolist() == [4.0, 1.0]
    with pytest.raises(ValueError, match=r"one integer class label per sample.*shape \(5,\)"):
        dataset_labels(Dicts((5,)))

    class Keys(Dicts):
        def __getitem__(self, i):
            return {"features": torch.zeros(2), "answer": 1}

    with pytest.raises(ValueError, match=r"keys \['answer', 'features'\]"):
        dataset_labels(Keys())
    with pytest.raises(ValueError, match=r"labels have shape \(4, 7\)"):
        dataset_labels(torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4, 7, dtype=torch.long)))


def test_bf16_true_training_with_the_guard_exports_and_reloads(tmp_path):
    """True half precision on the CPU: the guard feeds its set in the model's dtype, the export reloads exactly."""
    from lightning_xai import load_compressed

    pl.seed_everything(0)
    model = ImageClassifier("lenet")
    sc = SelfCompression(gamma=0.5, log_every_n_steps=0, export_path=str(tmp_path / "bf16.safetensors"))
    guard = PreservationGuard(fraction=0.1, check_every_n_steps=2)
    _trainer(tmp_path, [sc, guard], epochs=1, precision="bf16-true", limit_train_batches=6).fit(
        model, DigitsDataModule()
    )
    assert guard.last_accuracy is not None and guard._data[0].dtype == torch.bfloat16
    fresh = ImageClassifier("lenet")
    load_compressed(tmp_path / "bf16.safetensors", fresh)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.float().eval()(x))
