"""Physical removal of 0-bit channels: outputs unchanged, model smaller, optimizer state carried, rollback."""

import tempfile
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import assert_same_state, kill_channels, state_copy
from torch import nn
from torch.nn.utils import parametrize

from lightning_xai.models import MLP, LeNet, SmallResNet
from lightning_xai.pruning import surgery
from lightning_xai.pruning.surgery import remove_dead_channels, resize_to_state_dict
from lightning_xai.quantization.export import export_compressed, load_compressed
from lightning_xai.quantization.install import (
    gate_batchnorm,
    gate_following_batchnorms,
    install_quantizers,
    quantized_layers,
)


def _outputs(net, x):
    net.eval()
    with torch.no_grad():
        return net(x)


def test_lenet_removal_keeps_outputs_and_shrinks():
    net = LeNet()
    layers = install_quantizers(net)
    kill_channels(layers[0], [0, 5, 9])
    kill_channels(layers[2], range(10, 40))
    kill_channels(layers[3], [1, 2, 3])
    x = torch.randn(6, 1, 8, 8)
    y = _outputs(net, x)
    before = sum(p.numel() for p in net.parameters())
    report = remove_dead_channels(net, x)
    assert report.removed == {"features.0": 3, "features.5": 30, "classifier.1": 3}
    assert net.features[0].out_channels == 29 and net.features[2].in_channels == 29
    assert net.features[5].out_channels == 34
    assert net.classifier[1].in_features == 34 * 4 and net.classifier[1].out_features == 125
    assert net.classifier[3].in_features == 125
    assert sum(p.numel() for p in net.parameters()) < before
    torch.testing.assert_close(_outputs(net, x), y, rtol=1e-5, atol=1e-6)


def test_output_layer_is_never_removed():
    net = MLP(64, 10, 16)
    layers = install_quantizers(net)
    kill_channels(layers[-1], [3])
    report = remove_dead_channels(net, torch.randn(2, 64))
    assert report.removed == {}
    assert "model outputs" in report.rejected["net.5"]
    assert net.net[5].out_features == 10


def _gate_resnet_bns(net):
    layers = {q.name: q for q in quantized_layers(net)}
    for name, module in net.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            producer = {"stem.1": "stem.0"}.get(name) or name.replace("bn", "conv").replace("shortcut.1", "shortcut.0")
            gate_batchnorm(module, layers[producer].quantizer)
    return layers


def test_residual_groups_need_every_coupled_producer_dead():
    net = SmallResNet(width=4)
    layers = _gate_resnet_bns(net) if install_quantizers(net) else None
    x = torch.randn(3, 1, 8, 8)
    net.train()
    net(x)
    # inner conv of a block: free to remove (BN gated, ReLU(0) = 0)
    kill_channels(layers["layers.1.conv1"], [0, 1])
    # residual stream of stage 1: only conv2 dead, not the shortcut -> must stay
    kill_channels(layers["layers.1.conv2"], [2])
    y = _outputs(net, x)
    report = remove_dead_channels(net, x)
    assert report.removed == {"layers.1.conv1": 2}
    assert "still uses channels" in report.rejected["layers.1.conv2"]
    assert net.layers[1].conv1.out_channels == 6 and net.layers[1].bn1.num_features == 6
    assert net.layers[1].conv2.in_channels == 6
    torch.testing.assert_close(_outputs(net, x), y, rtol=1e-5, atol=1e-6)


def test_residual_group_removed_when_all_producers_dead():
    net = SmallResNet(width=4)
    install_quantizers(net)
    layers = _gate_resnet_bns(net)
    x = torch.randn(3, 1, 8, 8)
    # stage-2 residual stream channel 5 is written by layers.2.conv2 and layers.2.shortcut.0 only
    kill_channels(layers["layers.2.conv2"], [5])
    kill_channels(layers["layers.2.shortcut.0"], [5])
    y = _outputs(net, x)
    report = remove_dead_channels(net, x)
    assert report.removed.get("layers.2.conv2") == 1
    assert net.fc.in_features == 15
    torch.testing.assert_close(_outputs(net, x), y, rtol=1e-5, atol=1e-6)


def test_optimizer_state_follows_the_kept_channels():
    net = MLP(8, 3, 6, depth=1)
    layers = install_quantizers(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    x = torch.randn(5, 8)
    net(x).sum().backward()
    opt.step()
    w_old = layers[0].original
    avg_old = opt.state[w_old]["exp_avg"].clone()
    kill_channels(layers[0], [1, 4])
    remove_dead_channels(net, x, [opt])
    w_new = quantized_layers(net)[0].original
    assert w_new is not w_old and w_new.shape == (4, 8)
    assert any(p is w_new for g in opt.param_groups for p in g["params"])
    assert torch.equal(opt.state[w_new]["exp_avg"], avg_old[[0, 2, 3, 5]])
    assert w_old not in opt.state
    net(x).sum().backward()
    opt.step()  # shapes agree


def test_failure_mid_removal_restores_model_and_optimizer(monkeypatch):
    net = LeNet()
    layers = install_quantizers(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 1, 8, 8)
    net(x).sum().backward()
    opt.step()
    kill_channels(layers[0], [0, 1])
    kill_channels(layers[3], [7])
    saved = state_copy(net)
    params = [list(g["params"]) for g in opt.param_groups]
    calls = {"n": 0}
    real = surgery._sync_attributes

    def flaky(module):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        real(module)

    monkeypatch.setattr(surgery, "_sync_attributes", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        remove_dead_channels(net, x, [opt])
    monkeypatch.setattr(surgery, "_sync_attributes", real)
    assert_same_state(net, saved)
    assert [list(g["params"]) for g in opt.param_groups] == params
    assert net.features[0].out_channels == 32 and net.features[2].in_channels == 32
    assert not net.features[0]._forward_hooks and not net._forward_pre_hooks


def test_output_change_is_rolled_back():
    # Sigmoid(0) = 0.5: a dead channel feeding a padded conv through a sigmoid is not exactly removable
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.Conv2d(4, 2, 3, padding=1))
    layers = install_quantizers(net)
    kill_channels(layers[0], [1])
    saved = state_copy(net)
    report = remove_dead_channels(net, torch.randn(2, 1, 6, 6))
    assert report.removed == {}
    assert "change the model's outputs" in report.rejected["0"]
    assert_same_state(net, saved)


def test_torchvision_resnet18_inner_channels_removed():
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    layers = {q.name: q for q in install_quantizers(net)}
    x = torch.randn(2, 3, 64, 64)
    pairs = gate_following_batchnorms(net, x)
    assert ("layer1.0.bn1", "layer1.0.conv1") in pairs and ("bn1", "conv1") in pairs
    kill_channels(layers["layer1.0.conv1"], range(20))
    kill_channels(layers["layer3.1.conv1"], [0, 7, 9])
    kill_channels(layers["layer2.0.conv2"], [4])  # residual stream: shortcut still writes channel 4
    y = _outputs(net, x)
    before = sum(p.numel() for p in net.parameters())
    report = remove_dead_channels(net, x)
    assert report.removed == {"layer1.0.conv1": 20, "layer3.1.conv1": 3}
    assert "still uses channels" in report.rejected["layer2.0.conv2"]
    assert net.layer1[0].conv1.out_channels == 44 and net.layer1[0].bn1.num_features == 44
    assert net.layer1[0].conv2.in_channels == 44 and net.layer3[1].conv2.in_channels == 253
    assert sum(p.numel() for p in net.parameters()) < before
    torch.testing.assert_close(_outputs(net, x), y, rtol=1e-4, atol=1e-5)


def test_torchvision_mobilenet_v2_depthwise_chain_is_sliced_and_outputs_refused():
    net = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    layers = {q.name: q for q in install_quantizers(net)}
    x = torch.randn(2, 3, 64, 64)
    gate_following_batchnorms(net, x)
    kill_channels(layers["features.2.conv.0.0"], [1, 2])  # expansion conv feeding a depthwise conv
    kill_channels(layers["classifier.1"], [0])  # model outputs
    before = sum(p.numel() for p in net.parameters())
    net.eval()
    y = _outputs(net, x)[0]
    report = remove_dead_channels(net, x)
    assert report.removed == {"features.2.conv.0.0": 2}
    assert "model outputs" in report.rejected["classifier.1"]
    dw = net.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels == 94 and dw.weight.shape[0] == 94
    assert sum(p.numel() for p in net.parameters()) < before
    torch.testing.assert_close(_outputs(net, x)[0], y, rtol=1e-4, atol=1e-5)


def test_grouped_non_depthwise_convolutions_are_refused_safely():
    net = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 3, 1))
    layers = {q.name: q for q in install_quantizers(net)}
    kill_channels(layers["0"], [1])
    x = torch.randn(2, 2, 6, 6)
    saved = state_copy(net)
    report = remove_dead_channels(net, x)
    assert report.removed == {}
    assert "grouped convolution" in report.rejected["0"]
    assert_same_state(net, saved)


def test_gate_following_batchnorms_leaves_no_hooks_and_restores_modes():
    net = SmallResNet(width=4)
    install_quantizers(net)
    net.train()
    net.layers[0].eval()
    pairs = gate_following_batchnorms(net, torch.randn(2, 1, 8, 8))
    assert ("stem.1", "stem.0") in pairs and ("layers.2.shortcut.1", "layers.2.shortcut.0") in pairs
    assert net.training and not net.layers[0].training and net.layers[1].training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    modules = dict(net.named_modules())
    # the gates are folded into the (affine) batch norms' γ and β, nothing else is parametrized but the quantizers
    gated = {n for n, m in modules.items() if isinstance(m, torch.nn.BatchNorm2d) and parametrize.is_parametrized(m)}
    assert gated == {bn for bn, _ in pairs}


def test_batchnorm_gate_zeroes_dead_channels_with_nonzero_beta_and_running_stats():
    """A gated batch norm with β ≠ 0, γ ≠ 1 and non-zero running statistics outputs exactly 0 on a 0-bit channel, in
    eval and in train mode, also after export → reload; the latent γ/β keep their values."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    bn = net[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.7, 2.0, 0.3]))
        bn.bias.copy_(torch.tensor([0.4, 1.2, -0.9, 0.8]))
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.5, 1.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 0.7]))
    layers = install_quantizers(net)
    x = torch.randn(5, 2, 6, 6)
    gate_following_batchnorms(net, x)
    kill_channels(layers[0], [1, 3])
    for train in (False, True):
        net.train(train)
        with torch.no_grad():
            out = net[1](net[0](x))  # before the ReLU: β alone would make it non-zero
        assert torch.equal(out[:, [1, 3]], torch.zeros_like(out[:, [1, 3]])), train
        assert out[:, [0, 2]].abs().sum() > 0
    net.eval()
    assert torch.equal(bn.parametrizations.bias.original, torch.tensor([0.4, 1.2, -0.9, 0.8]))
    with torch.no_grad():
        expected = net(x)
    path = Path(tempfile.mkdtemp()) / "m.safetensors"
    export_compressed(net, path)
    fresh = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    load_compressed(path, fresh).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        assert torch.equal(fresh[1](fresh[0](x))[:, [1, 3]], torch.zeros(5, 2, 6, 6))


def test_resize_to_state_dict_then_load_roundtrip():
    net = LeNet()
    install_quantizers(net)
    kill_channels(quantized_layers(net)[1], range(20))
    remove_dead_channels(net, torch.randn(2, 1, 8, 8))
    sd = net.state_dict()
    fresh = LeNet()
    install_quantizers(fresh)
    resized = resize_to_state_dict(fresh, sd)
    assert resized and fresh.features[2].out_channels == 44
    fresh.load_state_dict(sd)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(_outputs(fresh, x), _outputs(net, x))


def test_bad_example_inputs_is_a_clear_error():
    net = LeNet()
    install_quantizers(net)
    kill_channels(quantized_layers(net)[0], [0])
    with pytest.raises(TypeError, match="`example_inputs` must be a tensor"):
        remove_dead_channels(net, 3)


def test_layer_losing_inputs_and_outputs_at_once_stays_in_the_optimizer():
    net = LeNet()
    layers = install_quantizers(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.randn(4, 1, 8, 8)
    net(x).sum().backward()
    opt.step()
    kill_channels(layers[0], range(5))  # features.2 loses inputs ...
    kill_channels(layers[1], range(10))  # ... and outputs in the same removal
    old_state = opt.state[layers[1].original]["exp_avg"].clone()
    remove_dead_channels(net, x, [opt])
    w = quantized_layers(net)[1].original
    assert w.shape == (54, 27, 3, 3)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is w for p in held)
    assert all(any(p is q for q in held) for p in net.parameters())
    assert torch.equal(opt.state[w]["exp_avg"], old_state[10:, 5:])


def test_transformer_rejections_give_the_real_reason():
    from lightning_xai.pruning.surgery import remove_dead_channels
    from lightning_xai.quantization.install import install_quantizers

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.block(self.inp(x)).mean(1))

    torch.manual_seed(0)
    net = Net()
    layers = {layer.name: layer for layer in install_quantizers(net, None, None, 8.0)}
    with torch.no_grad():
        layers["block.self_attn.out_proj"].quantizer.b[:2] = -1.0
        layers["inp"].quantizer.b[:2] = -1.0  # feeds the attention (and the residual stream)
    report = remove_dead_channels(net, torch.randn(2, 5, 6), [])
    assert "MultiheadAttention), whose embedding width" in report.rejected["inp"]
    normed = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    first = install_quantizers(normed, None, None, 8.0)[0]
    with torch.no_grad():
        first.quantizer.b[:2] = -1.0
    assert "normalises across the channels" in remove_dead_channels(normed, torch.randn(2, 6), []).rejected["0"]
    reason = report.rejected["block.self_attn.out_proj"]
    assert "embedding width of its MultiheadAttention 'block.self_attn'" in reason
    assert "residual stream" in reason


def _tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    net = SwinTransformer([4, 4], 8, [1, 1], [1, 1], [7, 7], num_classes=2).eval()
    return net, torch.randn(2, 3, 8, 8)


def test_dependency_tracing_that_does_not_end_is_refused_not_followed(monkeypatch):
    """torch-pruning's traversal of a Swin's last residual stream (windows padded past the 2x2 feature map) grows
    without end (it exhausted 24 GB on swin_t): find_units and the removal refuse that group with the reason, quickly,
    and keep the others; the bound must not touch a legitimate group."""
    from lightning_xai.pruning.units import find_units

    net, x = _tiny_swin()
    units, refused = find_units(net, x[:1])  # unbounded, this ran for minutes (and tens of GB on swin_t)
    for name in ("features.3.0.mlp.3", "features.2.reduction"):
        assert "does not terminate" in refused[name]
    assert "normalises across the channels" in refused["features.1.0.mlp.3"]
    assert {u.name for u in units} == {"features.1.0.mlp.0", "features.3.0.mlp.0"}  # the MLP hidden units remain
    layers = {q.name: q for q in install_quantizers(net, None, None, 8.0)}
    kill_channels(layers["features.3.0.mlp.3"], [0, 1])
    kill_channels(layers["features.3.0.mlp.0"], [0, 1, 2])
    y = _outputs(net, x)
    report = remove_dead_channels(net, x)
    assert "does not terminate" in report.rejected["features.3.0.mlp.3"]
    assert report.removed == {"features.3.0.mlp.0": 3}
    torch.testing.assert_close(_outputs(net, x), y, rtol=1e-4, atol=1e-5)
    # a bound this low cuts a legitimate conv -> flatten -> linear group: the same refusal (the bound is what acts)
    monkeypatch.setattr(surgery, "_MAX_GROUP_INDICES", 10)
    flat = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    _, refused = find_units(flat, torch.randn(1, 1, 6, 6))
    assert "does not terminate" in refused["0"]
    monkeypatch.undo()
    units, _ = find_units(flat, torch.randn(1, 1, 6, 6))
    assert [u.name for u in units] == ["0"]
