"""C-SWAP: units, masks vs physical removal, engines vs independent references, algorithms, curves, callback."""

import copy

import numpy as np
import pytest
import torch
import torchvision
from helpers import assert_same_state, quiet_trainer, state_copy
from scipy import stats
from torch import nn

from lightning_xai.attribution.causal import (
    CRITICAL,
    DETRIMENTAL,
    NEUTRAL,
    classify_neurons,
    reference_causal_scores,
    true_class_probability,
)
from lightning_xai.models.nets import SmallResNet
from lightning_xai.pruning import cswap as C
from lightning_xai.pruning import units as U
from lightning_xai.pruning.units import (
    ChannelMasker,
    apply_plan,
    count_parameters,
    find_units,
    load_pruned,
    save_pruned,
)


def _mlp(zero_cols=()):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        for c in zero_cols:
            net[2].weight[:, c] = 0.0
    return net


def _random_bn(net):
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.2, 0.2, generator=gen)
    return net.eval()


# ------------------------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("seed", range(3))
def test_per_class_p_values_equal_scipy(seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (50,), generator=gen)
    sigma = torch.rand(50, generator=gen, dtype=torch.float64) * 0.5 + 0.4
    star = (
        sigma + torch.randn(6, 50, generator=gen, dtype=torch.float64) * 0.05 + torch.linspace(-0.03, 0.03, 6)[:, None]
    )
    v = classify_neurons(sigma, star, labels, rtol=0.0)
    for j, k in enumerate(v.classes):
        mask = (labels == k).numpy()
        ref = stats.ttest_rel(star[:, mask].numpy(), np.broadcast_to(sigma[mask].numpy(), star[:, mask].shape), axis=1)
        np.testing.assert_allclose(v.p_values[:, j].numpy(), ref.pvalue, rtol=1e-9)
    xi = ((star - sigma) / sigma).mean(1)
    np.testing.assert_allclose(v.xi.numpy(), xi.numpy(), rtol=1e-12)


def test_rounding_level_changes_count_as_no_change():
    sigma = torch.rand(40, dtype=torch.float64) * 0.5 + 0.4
    labels = torch.arange(40) % 4
    noisy = sigma * (1 + 1e-7 * torch.sign(torch.randn(40, dtype=torch.float64)).abs())  # consistent, but rounding-size
    assert classify_neurons(sigma, noisy[None], labels).category.tolist() == [NEUTRAL]
    assert classify_neurons(sigma, noisy[None], labels, rtol=0.0).category.tolist() == [DETRIMENTAL]


# ------------------------------------------------------------------------------------------------------------
# units, masks, physical removal


def test_units_of_torchvision_models_match_the_papers_neuron_counts():
    # C-SWAP's appendix B explores 2,880 neurons in ResNet-18 and 9,128 in MobileNetV2 — grouping residual partners
    r18 = torchvision.models.resnet18(weights=None, num_classes=10)
    units, refused = find_units(r18, torch.randn(2, 3, 32, 32))
    assert sum(u.size for u in units) == 2880 and "fc" in refused
    mb = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    units, _ = find_units(mb, torch.randn(2, 3, 32, 32))
    assert sum(u.size for u in units) == 9128
    positions = [u.position for u in units]
    assert positions == sorted(positions, reverse=True)  # output → input


@pytest.mark.parametrize(
    "name",
    ["small_resnet", "resnet18", "mobilenet_v2"],
)
def test_physical_removal_equals_masks_and_counts(name):
    if name == "small_resnet":
        net, x = SmallResNet(1, 10, width=8), torch.randn(4, 1, 8, 8)
    elif name == "resnet18":
        net, x = torchvision.models.resnet18(weights=None, num_classes=10), torch.randn(2, 3, 32, 32)
    else:
        net, x = torchvision.models.mobilenet_v2(weights=None, num_classes=10), torch.randn(2, 3, 32, 32)
    net = _random_bn(net)
    units, _ = find_units(net, x)
    gen = torch.Generator().manual_seed(1)
    plan = {u.name: torch.randperm(u.size, generator=gen)[: u.size // 3].tolist() for u in units}
    before = sum(p.numel() for p in net.parameters())
    expected = count_parameters(net, units, plan)
    masker = ChannelMasker(net, units)
    for u in units:
        masker.remove(u.index, plan[u.name])
    with torch.no_grad(), masker.active():
        masked = net(x)
    after = apply_plan(net, units, plan, x)  # raises if physical != masked
    assert after == expected == sum(p.numel() for p in net.parameters()) < before
    with torch.no_grad():
        out = net(x)
    assert out.shape == masked.shape
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_removing_every_channel_of_a_unit_keeps_one_zeroed():
    net = _mlp()
    units, _ = find_units(net, torch.randn(2, 5))
    x = torch.randn(7, 5)
    plan = {"2": list(range(6))}  # the whole hidden layer 2
    masker = ChannelMasker(net, units)
    masker.remove(next(u.index for u in units if u.name == "2"), range(6))
    with torch.no_grad(), masker.active():
        masked = net(x)
    apply_plan(net, units, plan, x)
    assert net[2].out_features == 1 and bool((net[4].weight == 0).all())
    torch.testing.assert_close(net(x), masked)


def test_failed_removal_leaves_the_model_exactly_as_it_was(monkeypatch):
    net = _random_bn(SmallResNet(1, 10, width=4))
    x = torch.randn(3, 1, 8, 8)
    units, _ = find_units(net, x)
    saved = state_copy(net)
    real = U.apply_cuts

    def half_then_fail(model, cuts, optimizers=(), edits=None):
        real(model, list(cuts)[:3], optimizers, edits)
        raise RuntimeError("injected")

    monkeypatch.setattr(U, "apply_cuts", half_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        apply_plan(net, units, {units[0].name: [0, 1], units[-1].name: [2]}, x)
    assert_same_state(net, saved)
    assert net.layers[2].conv2.out_channels == 16
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_save_and_load_into_a_fresh_model_without_pickle(tmp_path):
    net = _random_bn(SmallResNet(1, 10, width=4))
    x = torch.randn(3, 1, 8, 8)
    units, _ = find_units(net, x)
    plan = {units[0].name: [0, 3], units[2].name: [1]}
    apply_plan(net, units, plan, x)
    path = tmp_path / "pruned.safetensors"
    save_pruned(net, path, plan)
    fresh, loaded_plan = load_pruned(path, SmallResNet(1, 10, width=4).eval())
    assert loaded_plan == plan
    torch.testing.assert_close(fresh(x), net(x))
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in net.parameters())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pruned(path, SmallResNet(1, 10, width=4))
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a lightning_xai pruned model"):
        load_pruned(tmp_path / "other.safetensors", SmallResNet(1, 10, width=4))


def test_invalid_plans_are_rejected_with_the_reason():
    net = _mlp()
    units, _ = find_units(net, torch.randn(2, 5))
    with pytest.raises(ValueError, match="unknown unit 'nope'"):
        count_parameters(net, units, {"nope": [0]})
    with pytest.raises(ValueError, match="has 8 channels, got indices \\[9\\]"):
        apply_plan(net, units, {"0": [9]}, torch.randn(2, 5))


# ------------------------------------------------------------------------------------------------------------
# engines and algorithms


def _engine_scores(mode, net, units, x, y):
    out = {}
    with C._eval_mode(net):
        masker = ChannelMasker(net, units)
        with masker.active():
            engine = C._make_engine(mode, net, units, masker, x, y, true_class_probability, 16)
            sigma = engine.baseline()
            for u in units:
                engine.begin_unit(u)
                out[u.name] = (sigma, engine.scores(u, list(range(u.size)), sigma))
    return out


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_engines_equal_an_independent_hook_reference(mode):
    net = _mlp()
    x = torch.randn(40, 5)
    y = torch.randint(0, 3, (40,))
    units, _ = find_units(net, x[:2])
    got = _engine_scores(mode, net, units, x, y)
    for u in units:
        consumer = net.get_submodule(u.consumers[0])
        sigma, star = reference_causal_scores(net, [consumer], range(u.size), x, y)
        torch.testing.assert_close(got[u.name][0], sigma, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got[u.name][1], star, rtol=1e-5, atol=1e-7)


def _trained_small_resnet():
    from lightning_xai.data import DigitsDataModule
    from lightning_xai.models import ImageClassifier

    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = ImageClassifier(SmallResNet(1, 10, width=4))
    quiet_trainer(None, [], max_epochs=2).fit(model, dm)
    net = model.net.eval()
    with torch.no_grad():  # a dead channel and a channel nobody reads: the exact shortcuts must agree too
        net.layers[1].conv1.weight[1] = 0.0
        net.layers[1].bn1.bias[1] = -1.0
        net.layers[2].conv2.weight[:, 3] = 0.0
    x, y = C.class_balanced_samples(dm.dataset("val"), 6)
    return net, x, y, dm


def _both_engines(net, units, x, y):
    """C-SWAP's order from the fast and the reference engine, checked identical (order, categories, ξ)."""
    fast = C.cswap_order(net, units, x, y, mode="fast")
    ref = C.cswap_order(net, units, x, y, mode="reference")
    assert fast.order == ref.order
    for u in ref.category:
        assert torch.equal(fast.category[u], ref.category[u])
        torch.testing.assert_close(fast.xi[u], ref.xi[u], rtol=1e-4, atol=1e-6)
    return fast, ref


def test_fast_mode_makes_the_same_decisions_as_the_reference():
    net, x, y, _ = _trained_small_resnet()
    units, _ = find_units(net, x[:2])
    saved = state_copy(net)
    fast, ref = _both_engines(net, units, x, y)
    assert 0 < fast.non_critical < len(fast.order)  # the progressive path was exercised
    assert fast.forwards < ref.forwards
    cats = fast.category_fractions()
    assert cats["critical"] > 0 and cats["neutral"] + cats["detrimental"] > 0
    assert_same_state(net, saved)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    unit = next(u for u in units if u.name == "layers.1.conv1")
    assert int(fast.category[unit.index][1]) == NEUTRAL  # the dead channel
    cbp_fast = C.cbp_order(net, units, x, y, mode="fast", cut="all")
    cbp_ref = C.cbp_order(net, units, x, y, mode="reference", cut="all")
    assert cbp_fast.order == cbp_ref.order


def test_chains_of_cumulative_cuts_decide_like_the_reference_in_far_fewer_forwards():
    """Untrained, two samples per class (the coverage matrix's setting): nearly every neuron is removed, so the fast
    engine judges them in chains of cumulative cuts; the decisions must still be the reference's, one by one."""
    net = _random_bn(SmallResNet(1, 2, width=8))
    torch.manual_seed(3)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 0, 1, 1])
    units, _ = find_units(net, x[:2])
    fast, ref = _both_engines(net, units, x, y)
    assert fast.non_critical > 0.8 * fast.neurons_evaluated  # the regime the chains are for
    assert ref.forwards > fast.neurons_evaluated  # the reference: one forward per neuron (plus baselines)
    assert fast.forwards < fast.neurons_evaluated / 3  # one forward per neuron before the chains


def test_classify_neurons_takes_one_before_row_per_neuron():
    s = torch.tensor([0.9, 0.8, 0.7, 0.9, 0.6, 0.8])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    stars = torch.stack([s * 0.5, s * 1.2 + torch.tensor([0, 0.01, 0, 0.02, 0, 0.01])])
    befores = torch.stack([s, stars[0]])  # neuron 1 judged after neuron 0's removal
    v = classify_neurons(befores, stars, labels)
    for i in range(2):
        one = classify_neurons(befores[i], stars[i : i + 1], labels)
        assert int(v.category[i]) == int(one.category[0]) and float(v.xi[i]) == float(one.xi[0])
    torch.testing.assert_close(v.xi[1], ((stars[1] - stars[0]) / stars[0]).double().mean())
    with pytest.raises(ValueError, match="expected \\(M,\\) or \\(N, M\\)"):
        classify_neurons(befores[:1], stars, labels)


def test_the_causal_analysis_runs_without_tf32_and_restores_the_settings():
    """On a GPU the engines agree exactly only in full fp32 (cuDNN's default TF32 moved 244 of 2,880 ResNet-18
    neurons into another category between them on an H200): the analysis turns TF32 off and restores it."""
    net = _mlp(zero_cols=[1])
    x = torch.randn(20, 5)
    y = net(x).argmax(1)
    units, _ = find_units(net, x[:2])
    seen = []

    def score(logits, labels):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return true_class_probability(logits, labels)

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        C.cswap_order(net, units, x, y, score_fn=score)
        assert seen and set(seen) == {(False, False)}
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cswap_removes_neutral_neurons_first_and_outputs_stay_the_same():
    net = _mlp(zero_cols=[1, 4, 6])
    x = torch.randn(60, 5)
    y = net(x).argmax(1)
    units, _ = find_units(net, x[:2])
    order = C.cswap_order(net, units, x, y)
    first = {(units[u].name, c) for u, c in order.order[: order.non_critical]}
    assert {("0", 1), ("0", 4), ("0", 6)} <= first
    neutral = [(units[u].name, c) for u, c in order.order[: order.non_critical] if order.category[u][c] == NEUTRAL]
    plan = {}
    for name, c in neutral:
        plan.setdefault(name, []).append(c)
    expected = net(x)
    apply_plan(net, units, plan, x)
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)


def test_orders_are_permutations_and_cbp_follows_algorithm_4():
    net, x, y, _ = _trained_small_resnet()
    units, _ = find_units(net, x[:2])
    every = sorted((u.index, c) for u in units for c in range(u.size))
    cbp = C.cbp_order(net, units, x, y)
    for order in (C.cswap_order(net, units, x, y), cbp, C.magnitude_order(units), C.random_order(units, 3)):
        assert sorted(order.order) == every
    cats = [int(cbp.category[u][c]) for u, c in cbp.order]
    xis = [float(cbp.xi[u][c]) for u, c in cbp.order]
    rank = {DETRIMENTAL: 0, NEUTRAL: 1, CRITICAL: 2}
    assert [rank[c] for c in cats] == sorted(rank[c] for c in cats)
    det = [v for c, v in zip(cats, xis) if c == DETRIMENTAL]
    neu = [abs(v) for c, v in zip(cats, xis) if c == NEUTRAL]
    cri = [v for c, v in zip(cats, xis) if c == CRITICAL]
    assert det == sorted(det, reverse=True) and neu == sorted(neu) and cri == sorted(cri, reverse=True)
    omp = C.magnitude_order(units)
    scores = [float(units[u].group_importance[c]) for u, c in omp.order]
    assert scores == sorted(scores)


def test_errors_leave_no_hooks_and_modes_restored():
    net = _mlp()
    net.train()
    units, _ = find_units(net, torch.randn(2, 5))
    calls = {"n": 0}

    def flaky(logits, labels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("score failed")
        return true_class_probability(logits, labels)

    saved = state_copy(net)
    with pytest.raises(RuntimeError, match="score failed"):
        C.cswap_order(net, units, torch.randn(20, 5), torch.randint(0, 3, (20,)), score_fn=flaky)
    assert net.training and all(m.training for m in net.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert_same_state(net, saved)


def test_bad_arguments_name_the_argument():
    net = _mlp()
    units, _ = find_units(net, torch.randn(2, 5))
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="`mode` must be 'fast' or 'reference', got 'quick'"):
        C.cswap_order(net, units, x, y, mode="quick")
    with pytest.raises(ValueError, match="`alpha` must be <= 1.0, got 2"):
        C.cswap_order(net, units, x, y, alpha=2)
    with pytest.raises(ValueError, match="`units` is empty"):
        C.cswap_order(net, [], x, y)
    with pytest.raises(ValueError, match="`inputs` has 10 samples but `labels` has 3"):
        C.cbp_order(net, units, x, y[:3])
    with pytest.raises(ValueError, match="`criterion` must be 'group_l2' or 'mean_abs'"):
        C.magnitude_order(units, "l3")
    with pytest.raises(ValueError, match="`per_class` must be >= 2"):
        C.class_balanced_samples(torch.utils.data.TensorDataset(x, y), 1)


# ------------------------------------------------------------------------------------------------------------
# curves and SAUCE


def test_sauce_is_the_normalised_trapezoid_area():
    x = [0.0, 0.1, 0.35, 0.8, 0.9]
    acc = [0.9, 0.9, 0.7, 0.2, 0.1]
    assert C.sauce(x, acc) == pytest.approx(100 * np.trapezoid(acc, x) / 0.9)
    with pytest.raises(ValueError, match="same length"):
        C.sauce([0.0], [1.0])


def test_pruning_curve_starts_at_the_model_and_removes_more_and_more():
    net, x, y, dm = _trained_small_resnet()
    units, _ = find_units(net, x[:2])
    tx, ty = dm.dataset("test").tensors
    saved = state_copy(net)
    curve = C.pruning_curve(net, units, C.magnitude_order(units), tx, ty, points=6)
    with torch.no_grad():
        acc = float((net(tx).argmax(1) == ty).double().mean())
    assert curve.removed[0] == 0.0 and curve.accuracy[0] == pytest.approx(acc)
    assert curve.removed == sorted(curve.removed) and len(curve.removed) >= 6
    total = sum(p.numel() for p in net.parameters())
    everything = {u.name: list(range(u.size)) for u in units}
    assert curve.removed[-1] == pytest.approx(1 - count_parameters(net, units, everything) / total)
    assert curve.kept_neurons[-1] == 0
    assert 0 <= curve.sauce <= 100
    assert_same_state(net, saved)
    k = C.prefix_for_ratio(net, units, C.random_order(units).order, 0.3)
    plan = C.plan_from_order(units, C.random_order(units).order, k)
    assert 1 - count_parameters(net, units, plan) / total >= 0.3
    smaller = C.plan_from_order(units, C.random_order(units).order, k - 1)
    assert 1 - count_parameters(net, units, smaller) / total < 0.3


def test_class_balanced_samples_draw_per_class():
    ds = torch.utils.data.TensorDataset(torch.arange(30.0)[:, None], torch.tensor([0] * 20 + [1] * 6 + [2] * 4))
    x, y = C.class_balanced_samples(ds, 5, seed=1)
    assert torch.bincount(y).tolist() == [5, 5, 4]
    assert torch.equal(ds.tensors[1][x[:, 0].long()], y)


# ------------------------------------------------------------------------------------------------------------
# the callback


def test_cswap_callback_prunes_logs_and_exports(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_xai.callbacks import CSWAPPruning
    from lightning_xai.data import DigitsDataModule
    from lightning_xai.models import ImageClassifier

    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = ImageClassifier(SmallResNet(1, 10, width=4))
    before = sum(p.numel() for p in model.parameters())
    cb = CSWAPPruning(target_ratio=0.3, samples_per_class=4, curves=("cswap", "omp"), export_path=tmp_path / "p.st")
    logger = TensorBoardLogger(tmp_path, name="run")
    quiet_trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(model, dm)
    after = sum(p.numel() for p in model.parameters())
    assert after == cb.result["params_after"] and after <= 0.7 * before + 1
    assert cb.result["params_before"] == before and set(cb.result["sauce"]) == {"cswap", "omp"}
    assert cb.result["flops_after"] < cb.result["flops_before"]
    fresh = ImageClassifier(SmallResNet(1, 10, width=4)).eval()
    load_pruned(tmp_path / "p.st", fresh)
    x = dm.dataset("val").tensors[0][:8]
    model.eval()
    torch.testing.assert_close(fresh(x), model(x))
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"pruning/sauce/cswap", "pruning/params_ratio", "pruning/latency_ratio", "pruning/accuracy_after"} <= scalars
    assert {"pruning/curves", "pruning/categories"} <= set(acc.Tags()["images"])
    state = cb.state_dict()
    again = CSWAPPruning(target_ratio=0.3)
    again.load_state_dict(copy.deepcopy(state))
    assert again.plan == cb.plan


def test_cswap_callback_arguments_are_validated():
    from lightning_xai.callbacks import CSWAPPruning

    with pytest.raises(ValueError, match="`target_ratio` must be < 1"):
        CSWAPPruning(target_ratio=1.0)
    with pytest.raises(ValueError, match="`method` must be one of"):
        CSWAPPruning(method="lrp")
    with pytest.raises(ValueError, match="needs `method`='cswap'"):
        CSWAPPruning(method="omp")
    with pytest.raises(ValueError, match="`curves` entries must be among"):
        CSWAPPruning(curves=("cswap", "l1"))
    with pytest.raises(ValueError, match="`analysis_split` must be 'train' or 'val'"):
        CSWAPPruning(analysis_split="test")
    with pytest.raises(ValueError, match="`samples_per_class` must be >= 2"):
        CSWAPPruning(samples_per_class=1)


def test_counts_and_removal_on_a_quantized_model():
    from lightning_xai.quantization.install import install_quantizers

    net = _random_bn(SmallResNet(1, 10, width=8))
    install_quantizers(net)
    x = torch.randn(3, 1, 8, 8)
    units, _ = find_units(net, x)
    plan = {u.name: list(range(0, u.size, 3)) for u in units}
    expected = count_parameters(net, units, plan)
    assert expected < sum(p.numel() for p in net.parameters())
    assert apply_plan(net, units, plan, x) == expected  # quantizer b/e and parametrized weights shrink too


def test_fit_end_pruning_resumes_like_an_uninterrupted_run_and_checkpoints_reload(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_xai.callbacks import AttributionPruning, CSWAPPruning, LRPCompression
    from lightning_xai.data import DigitsDataModule
    from lightning_xai.models import ImageClassifier

    def callbacks():
        return [
            CSWAPPruning(target_ratio=0.3, samples_per_class=4, curves=()),
            LRPCompression(samples_per_class=4, prune=0.2),
            AttributionPruning(num_batches=1),
        ]

    def fresh():
        torch.manual_seed(0)
        return ImageClassifier(SmallResNet(1, 10, width=4))

    import lightning.pytorch as pl

    pl.seed_everything(0)
    straight = fresh()
    cbs_a = callbacks()
    quiet_trainer(tmp_path / "a", cbs_a, max_epochs=2).fit(straight, DigitsDataModule(seed=0))

    pl.seed_everything(0)
    first = fresh()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    quiet_trainer(tmp_path / "b", [ckpt, *callbacks()], max_epochs=1).fit(first, DigitsDataModule(seed=0))
    # "interrupted" after epoch 1: the fit-end callbacks of that run pruned `first`, the checkpoint is unpruned
    resumed = fresh()
    cbs_b = callbacks()
    quiet_trainer(tmp_path / "c", cbs_b, max_epochs=2).fit(
        resumed, DigitsDataModule(seed=0), ckpt_path=tmp_path / "ck" / "last.ckpt"
    )
    assert cbs_b[0].plan == cbs_a[0].plan
    assert cbs_b[1].result["layers"] == cbs_a[1].result["layers"]
    assert cbs_b[2].pruned == cbs_a[2].pruned and cbs_b[2].result["ranking"] == cbs_a[2].result["ranking"]
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert list(sa) == list(sb) and all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)

    # a checkpoint written after pruning loads into a fresh full-size model (shapes follow the checkpoint)
    trainer = quiet_trainer(
        tmp_path / "d", [CSWAPPruning(target_ratio=0.3, samples_per_class=4, curves=())], max_epochs=1
    )
    pruned = fresh()
    trainer.fit(pruned, DigitsDataModule(seed=0))
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    again = fresh()
    cb = CSWAPPruning(target_ratio=0.3, samples_per_class=4, curves=())
    quiet_trainer(tmp_path / "e", [cb], max_epochs=1).fit(
        again, DigitsDataModule(seed=0), ckpt_path=tmp_path / "pruned.ckpt"
    )
    assert cb.plan == trainer.callbacks[0].plan  # restored: not pruned a second time
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_cbp_cuts_only_the_connections_to_critical_next_layer_neurons():
    net = _mlp()
    x = torch.randn(40, 5)
    y = net(x).argmax(1)
    units, _ = find_units(net, x[:2])
    order = C.cbp_order(net, units, x, y)  # cut="critical_next"
    hidden2 = next(u for u in units if u.name == "2")  # analysed first: its consumer is the output layer
    hidden1 = next(u for u in units if u.name == "0")
    critical2 = order.category[hidden2.index] == CRITICAL
    sigma = true_class_probability(net(x).detach(), y)
    for n in range(hidden1.size):  # by hand: zero W2[critical rows, n] on a copy
        m = copy.deepcopy(net)
        with torch.no_grad():
            m[2].weight[critical2, n] = 0.0
            star = true_class_probability(m(x), y)
        xi = float(((star - sigma) / sigma).mean())
        assert float(order.xi[hidden1.index][n]) == pytest.approx(xi, rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="`cut` must be 'critical_next' or 'all'"):
        C.cbp_order(net, units, x, y, cut="some")


def test_attention_heads_are_units_masked_like_their_removal():
    from lightning_xai.models.char_transformer import CharTransformer
    from lightning_xai.pruning.heads import PrunedHeadsAttention

    torch.manual_seed(7)
    net = CharTransformer(num_classes=3, dim=16, heads=4, depth=2).eval()
    with torch.no_grad():  # head 2 of block 0 silenced: its value rows are zero, so it must be found neutral
        net.blocks[0].attn.in_proj_weight[32 + 8 : 32 + 12] = 0.0
        net.blocks[0].attn.in_proj_bias[32 + 8 : 32 + 12] = 0.0
    x = torch.randint(1, 27, (24, 8))
    y = net(x).argmax(1)
    units, _ = find_units(net, x[:2])
    heads = {u.name: u for u in units if u.kind == "heads"}
    assert set(heads) == {"blocks.0.attn", "blocks.1.attn"} and heads["blocks.0.attn"].size == 4
    assert heads["blocks.0.attn"].consumers == ["blocks.0.attn.out_proj"]
    saved = state_copy(net)
    fast, ref = _both_engines(net, units, x, y)
    assert int(fast.category[heads["blocks.0.attn"].index][2]) == NEUTRAL
    assert_same_state(net, saved)
    assert type(net.blocks[0].attn) is nn.MultiheadAttention  # the masking class swap is undone
    # every head of block 1 and two of block 0: masked and physical agree (apply_plan checks), counts agree
    plan = {"blocks.0.attn": [1, 2], "blocks.1.attn": [0, 1, 2, 3]}
    predicted = U.count_parameters(net, units, plan)
    pruned = copy.deepcopy(net)
    assert U.apply_plan(pruned, units, plan, x[:4]) == predicted
    assert isinstance(pruned.blocks[0].attn, PrunedHeadsAttention) and pruned.blocks[0].attn.num_heads == 2
    assert pruned.blocks[1].attn.num_heads == 0
