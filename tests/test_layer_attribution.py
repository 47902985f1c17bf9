"""Layer scores against naive autograd, the scorer contract, zero/bypass pruning, the callback."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_same_state, quiet_trainer, state_copy
from torch import nn

from lightning_xai.attribution.layers import (
    GradientActivationScorer,
    L1Scorer,
    TaylorScorer,
    classification_loss,
    detection_loss,
)
from lightning_xai.callbacks.attribution_pruning import AttributionPruning, compare_rankings
from lightning_xai.models.nets import SmallResNet
from lightning_xai.pruning.layer_pruning import (
    bypassable_layers,
    default_candidates,
    layer_order,
    prune_layers,
    select_bottom,
    undo_layer_pruning,
)


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(48, 5), nn.Tanh(), nn.Linear(5, 3)
    )
    return net.double().eval()


def _naive(net, x, y, taylor=False):
    """Per sample, autograd on each layer's output; ``E_x[Σ|g·a|]`` (or ``E_x[|Σ g·a|]``)."""
    totals = {"0": 0.0, "3": 0.0, "5": 0.0}
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        a0 = net[0](xi)
        a3 = net[3](torch.flatten(torch.relu(a0), 1))
        a5 = net[5](torch.tanh(a3))
        loss = F.cross_entropy(a5, y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, [a0, a3, a5])
        for name, a, g in zip(totals, [a0, a3, a5], grads):
            totals[name] += float((g * a).sum().abs()) if taylor else float((g * a).abs().sum())
    return {k: v / x.shape[0] for k, v in totals.items()}


@pytest.mark.parametrize("cls,taylor", [(GradientActivationScorer, False), (TaylorScorer, True)])
def test_scores_equal_a_naive_per_sample_autograd(cls, taylor):
    net = _tiny()
    x = torch.randn(7, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    got = cls().score(net, [(x, y)])
    ref = _naive(net, x, y, taylor)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-10)


@pytest.mark.parametrize("cls", [GradientActivationScorer, TaylorScorer])
def test_batches_accumulate_to_the_score_of_the_concatenated_data(cls):
    net = _tiny()
    x = torch.randn(11, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    whole = cls().score(net, [(x, y)])
    parts = cls().score(net, [(x[:3], y[:3]), (x[3:4], y[3:4]), (x[4:], y[4:])])
    for k in whole:
        assert parts[k] == pytest.approx(whole[k], rel=1e-10)
    limited = cls(num_batches=1).score(net, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert limited == pytest.approx(cls().score(net, [(x[:3], y[:3])]))


def test_l1_is_the_sum_of_absolute_weights():
    net = _tiny()
    got = L1Scorer().score(net)
    assert got == pytest.approx({k: float(net.get_submodule(k).weight.abs().sum()) for k in ("0", "3", "5")})


class _Boom(Exception):
    pass


@pytest.mark.parametrize("scorer", [GradientActivationScorer, TaylorScorer, L1Scorer])
def test_scorer_contract_no_change_no_hooks_even_on_error(scorer):
    net = SmallResNet(1, 10, width=4)
    net.train()
    net.layers[0].eval()
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    saved = state_copy(net)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))

    def train_mode_loss(model, batch):  # like a detector: train mode, batch norms update their statistics
        model.train()
        return F.cross_entropy(model(batch[0]), batch[1], reduction="sum"), len(batch[1])

    calls = {"n": 0}

    def failing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Boom("loss failed")
        return train_mode_loss(model, batch)

    if scorer is L1Scorer:
        scorer().score(net, [(x, y)])
    else:
        scorer(train_mode_loss).score(net, [(x, y), (x, y)])
        with pytest.raises(_Boom):
            scorer(failing_loss).score(net, [(x, y), (x, y)])
    assert_same_state(net, saved)  # batch-norm statistics included
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in net.parameters())
    assert net.training and not net.layers[0].training and net.layers[1].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in net.modules())


def test_non_finite_loss_is_reported():
    net = _tiny()

    def nan_loss(model, batch):
        return model(batch[0]).sum() * float("nan"), 1

    with pytest.raises(FloatingPointError, match="not finite"):
        GradientActivationScorer(nan_loss).score(net, [(torch.randn(2, 2, 4, 4, dtype=torch.float64), None)])


def test_candidates_exclude_first_and_last_and_bottom_selection():
    net = SmallResNet(1, 10, width=4)
    x = torch.randn(2, 1, 8, 8)
    order = layer_order(net, x)
    assert order[0] == "stem.0" and order[-1] == "fc"
    assert default_candidates(net, x) == order[1:-1]
    assert default_candidates(net, x, include_first_last=True) == order
    scores = {n: float(i) for i, n in enumerate(order)}
    assert select_bottom(scores, 0.05, order[1:-1]) == [order[1]]
    assert select_bottom(scores, 0.2, order) == order[:2]  # round(0.2 · 10)
    with pytest.raises(ValueError, match="`fraction` must be in \\(0, 1\\)"):
        select_bottom(scores, 0.0, order)


def test_zero_mode_zeroes_and_undo_restores_exactly():
    net = SmallResNet(1, 10, width=4).eval()
    x = torch.randn(3, 1, 8, 8)
    saved = state_copy(net)
    record = prune_layers(net, ["layers.1.conv2"], "zero", x)
    assert bool((net.layers[1].conv2.weight == 0).all())
    ref = SmallResNet(1, 10, width=4).eval()
    ref.load_state_dict(saved)
    with torch.no_grad():
        ref.layers[1].conv2.weight.zero_()
        torch.testing.assert_close(net(x), ref(x))
    undo_layer_pruning(net, record)
    assert_same_state(net, saved)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "ssdlite"])
def test_bypass_keeps_outputs_and_removes_modules_on_torchvision_models(name):
    torch.manual_seed(0)
    if name == "ssdlite":
        net = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=3
        )
        example = ([torch.rand(3, 320, 320)],)
    else:
        net = getattr(torchvision.models, name)(weights=None, num_classes=10)
        example = (torch.randn(2, 3, 64, 64),)
    net.eval()
    candidates = default_candidates(net, example)
    able = bypassable_layers(net, example, candidates)
    assert able, "some layers keep their input's shape"
    chosen = list(able)[:2]
    params = sum(p.numel() for p in net.parameters())
    # the reference: the intact model with each bypassed module (layer and the batch norm reading it) made an
    # identity by a hook, so the pruned model must reproduce it value for value
    hooks = [
        net.get_submodule(member).register_forward_hook(lambda m, args, out: args[0])
        for name in chosen
        for member in able[name]
    ]
    with torch.no_grad():
        expected = net(*example)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        before = net(*example)
    record = prune_layers(net, chosen, "bypass", example)
    with torch.no_grad():
        after = net(*example)
    if isinstance(before, torch.Tensor):
        torch.testing.assert_close(after, expected, rtol=0, atol=0)
        assert not torch.allclose(after, before)  # the bypass did change the function
    else:
        assert [set(d) for d in after] == [set(d) for d in expected]
        for got, want in zip(after, expected):
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert all(isinstance(net.get_submodule(n), nn.Identity) for n in chosen)
    assert sum(p.numel() for p in net.parameters()) < params
    undo_layer_pruning(net, record)
    assert sum(p.numel() for p in net.parameters()) == params


def test_detection_loss_scores_a_detector_without_changing_it():
    torch.manual_seed(0)
    det = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    det.eval()
    saved = state_copy(det)
    images = [torch.rand(3, 320, 320) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 100.0, 140.0]]), "labels": torch.tensor([1])}] * 2
    scores = GradientActivationScorer(detection_loss).score(det, [(images, targets)])
    assert len(scores) > 50 and all(v >= 0 for v in scores.values())
    assert_same_state(det, saved)
    assert not det.training


def test_bypass_refuses_shape_changing_layers_and_leaves_the_model():
    net = SmallResNet(1, 10, width=4).eval()
    x = torch.randn(2, 1, 8, 8)
    saved = state_copy(net)
    with pytest.raises(ValueError, match="cannot bypass \\['layers.1.conv1'\\]"):
        prune_layers(net, ["layers.0.conv1", "layers.1.conv1"], "bypass", x)  # the second one halves the resolution
    assert_same_state(net, saved)
    assert isinstance(net.layers[0].conv1, nn.Conv2d)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        prune_layers(net, ["layers.0.conv1"], "drop", x)


def test_compare_rankings():
    a = {"x": 1.0, "y": 2.0, "z": 3.0}
    assert compare_rankings(a, a, list(a)) == {"spearman": pytest.approx(1.0), "kendall": pytest.approx(1.0)}
    b = {"x": 3.0, "y": 2.0, "z": 1.0}
    assert compare_rankings(a, b, list(a))["spearman"] == pytest.approx(-1.0)


@pytest.mark.parametrize("mode", ["zero", "bypass"])
def test_attribution_pruning_callback(tmp_path, mode):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_xai.data import DigitsDataModule
    from lightning_xai.models import ImageClassifier

    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = ImageClassifier(SmallResNet(1, 10, width=4, blocks=2))
    cb = AttributionPruning(mode=mode, num_batches=1)
    logger = TensorBoardLogger(tmp_path, name="run")
    quiet_trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(model, dm)
    r = cb.result
    assert len(r["pruned"]["gradxact"]) == 1 and len(r["pruned"]["l1"]) == 1
    assert set(r["ranking"]["gradxact"]) == set(r["candidates"]) == set(r["ranking"]["l1"])
    assert -1 <= r["spearman"] <= 1 and 0 <= r["accuracy_attr"] <= 1
    pruned = model.get_submodule(r["pruned"]["gradxact"][0])
    if mode == "bypass":
        assert isinstance(pruned, nn.Identity)
    else:
        assert bool((pruned.weight == 0).all())
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {"pruning/layers/spearman", "pruning/layers/accuracy_attr"} <= set(acc.Tags()["scalars"])
    assert "pruning/layers/rankings" in acc.Tags()["images"]


def test_attribution_pruning_arguments_are_validated():
    with pytest.raises(ValueError, match="`scorer` must be one of"):
        AttributionPruning(scorer="lrp")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        AttributionPruning(mode="drop")
    with pytest.raises(ValueError, match="`fraction` must be <= 0.5"):
        AttributionPruning(fraction=0.9)
    with pytest.raises(ValueError, match="`num_batches` must be >= 1"):
        AttributionPruning(num_batches=0)


def test_classification_loss_is_summed():
    net = _tiny()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    loss, n = classification_loss(net, (x, y))
    assert n == 4 and float(loss) == pytest.approx(float(F.cross_entropy(net(x), y, reduction="sum")))


def _ddp_worker(rank, world, port, x, y, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = _tiny()
        half = x.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        out[rank] = GradientActivationScorer().score(net, [(x[sl], y[sl])])
    finally:
        dist.destroy_process_group()


def test_scores_are_all_reduced_across_ddp_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, port, x, y, out), nprocs=2, join=True)
        per_rank = dict(out)
    whole = GradientActivationScorer().score(_tiny(), [(x, y)])
    for rank in (0, 1):
        assert per_rank[rank] == pytest.approx(whole, rel=1e-10)  # every rank holds the global expectation


def test_attribution_pruning_refuses_to_prune_every_candidate(tmp_path):
    from lightning_xai.data import DigitsDataModule
    from lightning_xai.models import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier("mlp")  # three Linear layers: the middle one is the only candidate
    cb = AttributionPruning(num_batches=1)
    with pytest.raises(ValueError, match=r"of 1 candidate layer\(s\).*would prune all of them") as err:
        quiet_trainer(tmp_path, [cb], max_epochs=1).fit(model, DigitsDataModule(batch_size=64))
    assert cb.result is None or not cb.result.get("pruned")
    # the remedies it names are ones that help: already in mode 'zero', one candidate (no `fraction` helps)
    assert str(err.value).endswith("layer pruning needs a deeper model or `include_first_last=True`")


def test_zero_mode_zeroes_a_layer_that_self_compression_quantizes(tmp_path):
    """Zeroing a quantized layer writes into its latent weight and bias (the quantizer and the bias gate map zero to
    exactly zero); before, it wrote into the computed tensors, a no-op the report did not notice."""
    from lightning_xai.callbacks import SelfCompression
    from lightning_xai.data import DigitsDataModule
    from lightning_xai.evaluation import accuracy
    from lightning_xai.models import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier("lenet")
    dm = DigitsDataModule(batch_size=64)
    cb = AttributionPruning(mode="zero", num_batches=2)
    quiet_trainer(tmp_path, [SelfCompression(gamma=0.05, log_every_n_steps=0), cb], max_epochs=2).fit(model, dm)
    (name,) = cb.result["pruned"]["gradxact"]
    layer = model.get_submodule(name)
    assert torch.count_nonzero(layer.weight) == 0 and (layer.bias is None or torch.count_nonzero(layer.bias) == 0)
    x, y = dm.dataset("val").tensors
    model.eval()
    assert accuracy(model, x, y) == pytest.approx(cb.result["accuracy_attr"])
