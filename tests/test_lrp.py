"""LRP rules against naive float64 loops, conservation, canonization, mixed precision export, the callback."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_state, quiet_trainer, state_copy
from torch import nn

from lightning_xai.attribution.lrp import AlphaBeta, Composite, Epsilon, ZBox, ZPlus, canonized, lrp, weight_relevance
from lightning_xai.models.nets import LeNet, SmallResNet
from lightning_xai.quantization.mixed import (
    apply_weight_plans,
    export_mixed,
    load_mixed,
    magnitude_plan,
    packed_size,
    quantize_tensor,
    relevance_plan,
    uniform_plan,
)


def _dense(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.ReLU(), nn.Linear(5, 3, bias=bias)).double().eval()


def _naive_layer(rule, a, w, b, r, low=None, high=None):
    """Loops over samples n, outputs j, inputs i: returns (R_in (N, I), R_W (J, I))."""
    n_s, n_i = a.shape
    n_j = w.shape[0]
    r_in = torch.zeros_like(a)
    r_w = torch.zeros_like(w)
    for n in range(n_s):
        for j in range(n_j):
            if isinstance(rule, Epsilon):
                z = sum(a[n, i] * w[j, i] for i in range(n_i)) + (b[j] if b is not None else 0)
                z = z + rule.eps * (1 if z >= 0 else -1)
                contrib = [a[n, i] * w[j, i] / z * r[n, j] for i in range(n_i)]
            elif isinstance(rule, ZPlus):
                z = sum(a[n, i] * max(w[j, i], 0) for i in range(n_i)) + rule.eps
                contrib = [a[n, i] * max(w[j, i], 0) / z * r[n, j] for i in range(n_i)]
            elif isinstance(rule, AlphaBeta):
                terms = [a[n, i] * w[j, i] for i in range(n_i)]
                zp = sum(t for t in terms if t > 0) + rule.eps
                zn = sum(t for t in terms if t < 0) - rule.eps
                contrib = [
                    (rule.alpha * (t if t > 0 else 0) / zp - rule.beta * (t if t < 0 else 0) / zn) * r[n, j]
                    for t in terms
                ]
            else:  # ZBox
                terms = [a[n, i] * w[j, i] - low * max(w[j, i], 0) - high * min(w[j, i], 0) for i in range(n_i)]
                z = sum(terms) + rule.eps * (1 if sum(terms) >= 0 else -1)
                contrib = [t / z * r[n, j] for t in terms]
            for i in range(n_i):
                r_in[n, i] += contrib[i]
                r_w[j, i] += contrib[i]
    return r_in, r_w


@pytest.mark.parametrize(
    "first,second",
    [
        (Epsilon(1e-6), Epsilon(1e-6)),
        (Epsilon(0.25), Epsilon(0.1)),
        (ZBox(-1.0, 2.0), ZPlus()),
        (Epsilon(1e-6), AlphaBeta(2.0, 1.0)),
        (AlphaBeta(1.0, 0.0), AlphaBeta(3.0, 2.0)),
    ],
)
def test_rules_equal_naive_loops_in_float64(first, second):
    net = _dense(bias=not isinstance(first, ZBox))
    x = torch.rand(6, 4, dtype=torch.float64) * 3 - 1
    composite = Composite(by_name={"0": first, "2": second})
    res = lrp(net, x, composite=composite)
    with torch.no_grad():
        h = torch.relu(net[0](x))
        out = net[2](h)
    t = out.argmax(1)
    r_out = torch.zeros_like(out).scatter_(1, t[:, None], out.gather(1, t[:, None]))
    r_h, rw2 = _naive_layer(second, h, net[2].weight, net[2].bias, r_out)
    kw = {"low": first.low, "high": first.high} if isinstance(first, ZBox) else {}
    r_x, rw1 = _naive_layer(first, x, net[0].weight, net[0].bias, r_h, **kw)
    torch.testing.assert_close(res.weights["2"], rw2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.weights["0"], rw1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.input, r_x, rtol=1e-9, atol=1e-12)


def test_conv_epsilon_equals_the_unfolded_matrix_form():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=True).double()
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double().eval()
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    res = lrp(net, x)
    r_conv_out = res.activations["0"]  # relevance of the conv's output
    cols = F.unfold(x, 3, padding=1)  # (N, 2*9, 16)
    w = conv.weight.reshape(3, -1)  # (3, 18)
    z = torch.einsum("ji,nip->njp", w, cols) + conv.bias[None, :, None]
    z = z + 1e-6 * torch.where(z >= 0, 1.0, -1.0)
    s = r_conv_out.reshape(3, 3, 16) / z
    rw = torch.einsum("ji,nip,njp->ji", w, cols, s).reshape_as(conv.weight)
    r_cols = torch.einsum("ji,nip,njp->nip", w, cols, s)
    r_in = F.fold(r_cols, (4, 4), 3, padding=1)
    torch.testing.assert_close(res.weights["0"], rw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.input, r_in, rtol=1e-9, atol=1e-12)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(h + self.conv2(h))
        return self.fc(self.avg(self.pool(h)).flatten(1))


@pytest.mark.parametrize("make", [lambda: _dense(bias=False), lambda: _Residual().double().eval()])
def test_relevance_is_conserved_without_bias(make):
    net = make()
    x = torch.rand(5, 4, dtype=torch.float64) if isinstance(net, nn.Sequential) else torch.rand(5, 1, 6, 6).double()
    res = lrp(net, x, composite=Composite(default=Epsilon(1e-12)))
    torch.testing.assert_close(res.input.sum(), res.output.sum(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        res.input.sum((1,) if x.dim() == 2 else (1, 2, 3)), res.output.sum(1), rtol=1e-6, atol=1e-9
    )


def test_weight_relevance_summed_over_inputs_is_the_layer_output_relevance():
    net = _Residual().double().eval()
    x = torch.rand(4, 1, 6, 6).double()
    res = lrp(net, x, composite=Composite(default=Epsilon(1e-12)))
    for layer in ("conv1", "conv2", "fc"):
        out_rel = res.activations[layer]  # relevance arriving at the layer's output, per sample
        per_out = out_rel.sum(0) if out_rel.dim() == 2 else out_rel.sum((0, 2, 3))
        got = res.weights[layer].sum(tuple(range(1, res.weights[layer].dim())))
        torch.testing.assert_close(got, per_out, rtol=1e-6, atol=1e-9)


def test_residual_addition_splits_relevance_in_proportion():
    class Add(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2, bias=False)
            self.b = nn.Linear(2, 2, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    net = Add().double()
    x = torch.rand(3, 2).double()
    res = lrp(net, x, composite=Composite(default=Epsilon(1e-12)))
    za, zb = net.a(x).detach(), net.b(x).detach()
    share_a = za / (za + zb) * res.output
    torch.testing.assert_close(res.activations["a"], share_a, rtol=1e-6, atol=1e-9)


def test_batch_norm_folding_keeps_outputs_and_is_undone():
    net = SmallResNet(1, 10, width=4).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(3, 1, 8, 8)
    saved = state_copy(net)
    before = net(x)
    with canonized(net) as pairs:
        assert ("stem.0", "stem.1") in pairs and len(pairs) == 9
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)
        assert net.stem[0].bias is not None
    assert net.stem[0].bias is None  # added for the fold, removed again
    assert_same_state(net, saved)
    with pytest.raises(RuntimeError, match="inside"):
        with canonized(net):
            raise RuntimeError("inside")
    assert_same_state(net, saved)


def test_unsupported_modules_are_named_and_nothing_is_left_behind():
    net = nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 2))
    saved = state_copy(net)
    with pytest.raises(ValueError, match=r"module `1` \(Softmax\)"):
        lrp(net, torch.rand(2, 3))
    bn_first = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
    with pytest.raises(ValueError, match="cannot fold batch norm `0`"):
        lrp(bn_first, torch.rand(2, 3))
    assert_same_state(net, saved)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_an_error_mid_propagation_restores_the_model(monkeypatch):
    net = SmallResNet(1, 10, width=4)
    net.train()
    saved = state_copy(net)

    def boom(*args, **kwargs):
        raise RuntimeError("rule failed")

    monkeypatch.setattr(Epsilon, "__call__", boom)
    with pytest.raises(RuntimeError, match="rule failed"):
        lrp(net, torch.randn(2, 1, 8, 8))
    assert_same_state(net, saved)
    assert net.training and net.stem[0].bias is None


def test_batched_weight_relevance_equals_one_pass():
    net = LeNet().eval()
    x = torch.randn(10, 1, 8, 8)
    y = torch.randint(0, 10, (10,))
    whole = weight_relevance(net, x, y, batch_size=10)
    parts = weight_relevance(net, x, y, batch_size=3)
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], rtol=1e-4, atol=1e-6)
    assert not any(r.requires_grad for r in whole.values())  # plain tensors, no autograd graph attached


# ------------------------------------------------------------------------------------------------------------
# plans, quantization, packed export


def test_relevance_plan_prunes_nonpositive_and_splits_at_the_median():
    r = torch.tensor([[-2.0, 0.0, 1.0], [2.0, 3.0, 4.0]])
    p = relevance_plan(r)
    assert p.keep.tolist() == [[False, False, True], [True, True, True]]
    assert p.high.tolist() == [[False, False, False], [False, True, True]]  # median of (1, 2, 3, 4) is 2
    assert p.mean_bits == pytest.approx(6.0)
    q = relevance_plan(r, prune=0.5, bits=(16, 8))
    assert q.kept == 3 and q.high_bits == 16
    with pytest.raises(ValueError, match="`prune` must be 'nonpositive' or a quantile"):
        relevance_plan(r, prune="negative")
    with pytest.raises(ValueError, match="`bits` must be"):
        relevance_plan(r, bits=(4, 8))


def test_packed_export_round_trip_and_real_size(tmp_path):
    from safetensors import safe_open

    net = LeNet().eval()
    torch.manual_seed(0)
    plans = {}
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            plans[name] = relevance_plan(torch.randn_like(m.weight))
    plans["classifier.3"] = uniform_plan(net.classifier[3].weight, 5)
    plans["features.0"] = magnitude_plan(net.features[0].weight, 100, 6)
    x = torch.randn(4, 1, 8, 8)
    expected = copy.deepcopy(net)
    apply_weight_plans(expected, plans)
    path = tmp_path / "m.safetensors"
    file_bytes = export_mixed(net, plans, path)
    with safe_open(str(path), "pt") as f:
        payload = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    assert payload == packed_size(net, plans) < file_bytes
    float_bytes = sum(v.numel() * 4 for v in net.state_dict().values())
    assert payload < 0.3 * float_bytes
    loaded = load_mixed(path, LeNet().eval())
    torch.testing.assert_close(loaded(x), expected(x))
    for name, plan in plans.items():
        w = dict(loaded.named_modules())[name].weight
        assert bool((w[~plan.keep] == 0).all())
        torch.testing.assert_close(w, quantize_tensor(dict(net.named_modules())[name].weight.detach(), plan))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_mixed(path, LeNet())


# ------------------------------------------------------------------------------------------------------------
# callback and data


def _fit(tmp_path, cb, logger=False):
    from lightning_xai.data import SyntheticMultiDataModule
    from lightning_xai.models import ImageClassifier

    torch.manual_seed(0)
    dm = SyntheticMultiDataModule(n_samples=600, seed=0)
    model = ImageClassifier("mlp", input_shape=(20,), num_classes=6, hidden=32)
    quiet_trainer(tmp_path, [cb], max_epochs=2, logger=logger).fit(model, dm)
    return model, dm


def test_lrp_callback_compresses_logs_and_exports(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_xai.callbacks import LRPCompression
    from lightning_xai.models import ImageClassifier

    cb = LRPCompression(samples_per_class=8, prune=0.3, bits=(8, 4), export_path=tmp_path / "c.safetensors")
    logger = TensorBoardLogger(tmp_path, name="run")
    model, dm = _fit(tmp_path, cb, logger)
    r = cb.result
    assert 0.25 < r["pruned_fraction"] < 0.35 and r["size_ratio"] < 0.36
    assert set(r["layers"]) == {"net.net.1", "net.net.3", "net.net.5"}
    fresh = load_mixed(tmp_path / "c.safetensors", ImageClassifier("mlp", input_shape=(20,), num_classes=6, hidden=32))
    x = dm.dataset("val").tensors[0][:8]
    model.eval()
    torch.testing.assert_close(fresh(x), model(x))
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0}).Reload()
    assert "compression/lrp/relevance/net.net.1" in acc.Tags()["histograms"]
    assert {"compression/lrp/size_ratio", "compression/lrp/accuracy_after"} <= set(acc.Tags()["scalars"])


def test_lrp_callback_leaves_the_model_untouched_when_it_fails(tmp_path, monkeypatch):
    from lightning_xai.callbacks import LRPCompression
    from lightning_xai.callbacks import lrp_compression as module

    calls = {"n": 0}
    real = module.accuracy

    def fail_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after the weights were replaced
            raise RuntimeError("evaluation failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "accuracy", fail_second)
    snapshots = {}

    class Snapshotting(LRPCompression):
        def on_fit_end(self, trainer, pl_module):
            snapshots["before"] = state_copy(pl_module)
            try:
                super().on_fit_end(trainer, pl_module)
            finally:
                snapshots["after"] = state_copy(pl_module)

    with pytest.raises(RuntimeError, match="evaluation failed"):
        _fit(tmp_path, Snapshotting(samples_per_class=4))
    assert calls["n"] == 2  # it failed after the weights had been replaced
    before, after = snapshots["before"], snapshots["after"]
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_lrp_callback_arguments_are_validated():
    from lightning_xai.callbacks import LRPCompression

    with pytest.raises(ValueError, match="`relevance` must be 'signed' or 'absolute'"):
        LRPCompression(relevance="abs")
    with pytest.raises(ValueError, match="`prune` must be"):
        LRPCompression(prune=1.5)
    with pytest.raises(ValueError, match="`bits` must be"):
        LRPCompression(bits=(8, 1))
    with pytest.raises(ValueError, match="`analysis_split` must be 'train' or 'val'"):
        LRPCompression(analysis_split="all")


def test_synthetic_multi_data_is_deterministic_and_stratified():
    from lightning_xai.data import SyntheticMultiDataModule

    a, b = SyntheticMultiDataModule(n_samples=600, seed=1), SyntheticMultiDataModule(n_samples=600, seed=1)
    xa, ya = a.dataset("train").tensors
    xb, yb = b.dataset("train").tensors
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.bincount(ya).min() > 0.8 * torch.bincount(ya).max()
    with pytest.raises(ValueError, match="`n_samples` must be an integer >= 60"):
        SyntheticMultiDataModule(n_samples=10)


def test_non_finite_relevance_is_reported_not_propagated():
    net = _dense()
    x = torch.rand(3, 4, dtype=torch.float64)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite relevance for layer"):
        weight_relevance(net, x)


@pytest.mark.parametrize("lrp_first", [False, True])
def test_lrp_compression_with_self_compression_is_refused_before_the_model_changes(tmp_path, lrp_first):
    """Both quantize the weights; under SelfCompression's quantizers LRP's in-place writes would change temporaries
    (before: LRP reported 52 % pruned and a size ratio of 1.14 while the model stayed as it was). Whichever callback's
    setup runs first refuses, before the model has quantizers."""
    from lightning_xai import LRPCompression, SelfCompression
    from lightning_xai.data import DigitsDataModule
    from lightning_xai.models import ImageClassifier
    from lightning_xai.quantization.install import quantized_layers

    model = ImageClassifier("lenet")
    saved = state_copy(model)
    callbacks = [LRPCompression(), SelfCompression()] if lrp_first else [SelfCompression(), LRPCompression()]
    with pytest.raises(ValueError, match="LRPCompression cannot run in the same Trainer as SelfCompression"):
        quiet_trainer(tmp_path, callbacks, max_epochs=1).fit(model, DigitsDataModule(batch_size=64))
    assert not quantized_layers(model)
    assert_same_state(model, saved)
