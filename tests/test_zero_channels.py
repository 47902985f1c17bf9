"""Removal of channels that coupled producers still write but every consumer receives as exact zeros.

A squeeze-excitation block (MobileNet-V3, EfficientNet) couples the expansion layer, the depthwise convolution and
the excitation's second layer on one channel space; a channel whose depthwise convolution is at 0 bits is zero after
its gated batch norm, its activation and the excitation's product, whatever the other two write. Residual partners
dead on some shared channels lose those. Every test compares outputs on inputs the removal never saw.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from helpers import kill_channels
from torch import nn
from torchvision.ops import SqueezeExcitation

from lightning_xai.models import SmallResNet
from lightning_xai.pruning import surgery
from lightning_xai.pruning.surgery import remove_dead_channels
from lightning_xai.quantization.install import gate_following_batchnorms, install_quantizers, quantized_layers


def _outputs(net, x):
    net.eval()
    with torch.no_grad():
        return net(x)


def _randomise_batch_norms(net, seed=0):
    """Running statistics and affine parameters away from their defaults, so that a batch norm fed zeros outputs a
    nonzero constant (what makes a wrong removal visible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


class MBConvSE(nn.Module):
    """Stem, then an inverted residual block with squeeze-excitation (torchvision's), then a classifier."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.leak = leak  # also scale the block by a maximum of the expansion's activations over channels
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.se = SqueezeExcitation(16, 4, activation=nn.SiLU)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        s = F.silu(self.bn0(self.stem(x)))
        e = F.silu(self.bn1(self.expand(s)))
        h = F.silu(self.bn2(self.dw(e)))
        if self.leak:
            h = h * torch.sigmoid(e.amax(1, keepdim=True))
        h = self.bn3(self.project(self.se(h))) + s
        return self.head(h.mean((2, 3)))


def test_squeeze_excitation_channels_go_when_their_depthwise_conv_is_dead():
    torch.manual_seed(0)
    net = MBConvSE()
    _randomise_batch_norms(net)
    install_quantizers(net)
    x = torch.randn(4, 3, 8, 8)
    gate_following_batchnorms(net, x)
    layers = {layer.name: layer for layer in quantized_layers(net)}
    kill_channels(layers["dw"], [2, 5, 11])  # the expansion layer and se.fc2 still write these channels
    kill_channels(layers["expand"], [5, 7])  # 7: the depthwise conv is alive there, its batch norm adds a constant
    fresh = torch.randn(6, 3, 8, 8)
    y, y_fresh = _outputs(net, x), _outputs(net, fresh)
    before, twin = copy.deepcopy(net), copy.deepcopy(net)
    report = remove_dead_channels(net, x)
    assert remove_dead_channels(twin, x).removed == report.removed  # a deep copy keeps its gates
    # the expansion layer comes first: its channel 5 goes with its group, the depthwise conv's group takes 2 and 11
    assert report.removed == {"expand": 1, "dw": 2}
    assert report.removed_idxs["expand"] == report.removed_idxs["dw"] == [2, 5, 11]
    assert report.rejected["expand"].startswith("dead channels [7] stayed")
    assert net.expand.out_channels == net.dw.out_channels == net.bn2.num_features == 13
    assert net.se.fc1.in_channels == net.se.fc2.out_channels == net.project.in_channels == 13
    torch.testing.assert_close(_outputs(net, x), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_outputs(net, fresh), y_fresh, rtol=1e-5, atol=1e-6)  # exact beyond the examples
    # in training mode too (batch statistics): the removed channels were zero there as well
    batch = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(net.train()(batch), before.train()(batch), rtol=1e-5, atol=1e-6)


def test_a_live_producer_whose_channel_leaves_by_another_way_keeps_the_group():
    torch.manual_seed(0)
    net = MBConvSE(leak=True)  # the expansion's live channels reach every channel through a maximum over them
    _randomise_batch_norms(net)
    install_quantizers(net)
    x = torch.randn(4, 3, 8, 8)
    gate_following_batchnorms(net, x)
    layers = {layer.name: layer for layer in quantized_layers(net)}
    kill_channels(layers["dw"], [2, 5, 11])
    y = _outputs(net, x)
    report = remove_dead_channels(net, x)
    assert report.removed == {}
    assert "still uses channels" in report.rejected["dw"]  # refused on structure, not by the output check
    assert net.dw.out_channels == 16
    torch.testing.assert_close(_outputs(net, x), y, rtol=0, atol=0)


def test_residual_partners_lose_the_channels_they_all_leave_dead():
    net = SmallResNet(width=4)
    _randomise_batch_norms(net, seed=1)
    install_quantizers(net)
    x = torch.randn(3, 1, 8, 8)
    gate_following_batchnorms(net, x)
    layers = {layer.name: layer for layer in quantized_layers(net)}
    # stage 1's residual stream (8 channels) is written by conv2 and the shortcut; both are dead on 2 and 3 only
    kill_channels(layers["layers.1.conv2"], [1, 2, 3])
    kill_channels(layers["layers.1.shortcut.0"], [2, 3, 4])
    fresh = torch.randn(5, 1, 8, 8)
    y, y_fresh = _outputs(net, x), _outputs(net, fresh)
    report = remove_dead_channels(net, x)
    assert report.removed == {"layers.1.conv2": 2}
    assert report.removed_idxs["layers.1.conv2"] == report.removed_idxs["layers.1.shortcut.0"] == [2, 3]
    assert "still uses channels [4]" in report.rejected["layers.1.shortcut.0"]
    assert report.rejected["layers.1.conv2"].startswith("dead channels [1] stayed")
    assert net.layers[1].conv2.out_channels == net.layers[1].shortcut[0].out_channels == 6
    assert net.layers[2].conv1.in_channels == net.layers[2].shortcut[0].in_channels == 6
    torch.testing.assert_close(_outputs(net, x), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_outputs(net, fresh), y_fresh, rtol=1e-5, atol=1e-6)


class CatAndConstant(nn.Module):
    """Two branches concatenated into one consumer, and a branch whose removal would change the outputs (a live
    depthwise conv after a dead channel passes its batch norm's positive shift on)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(3, 4, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(8, 5, 1)
        self.e = nn.Conv2d(3, 4, 1, bias=False)
        self.bn_e = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn_dw = nn.BatchNorm2d(4)
        self.f = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        ab = torch.cat([F.relu(self.bn_a(self.a(x))), F.relu(self.bn_b(self.b(x)))], 1)
        side = F.relu(self.bn_dw(self.dw(F.relu(self.bn_e(self.e(x))))))
        return self.c(ab) + self.f(side)


def test_groups_applied_one_by_one_are_renumbered_past_earlier_removals():
    torch.manual_seed(0)
    net = CatAndConstant()
    with torch.no_grad():
        net.bn_dw.bias.fill_(1.0)  # fed zeros, the depthwise branch outputs relu(1) = 1: e's channel is not dead
    install_quantizers(net)
    x = torch.randn(4, 3, 6, 6)
    gate_following_batchnorms(net, x)
    layers = {layer.name: layer for layer in quantized_layers(net)}
    kill_channels(layers["a"], [1])
    kill_channels(layers["b"], [2])  # c's input channel 6 as planned, 5 once a's channel 1 is gone
    kill_channels(layers["e"], [0])
    y = _outputs(net, x)
    report = remove_dead_channels(net, x)
    # all at once fails (e), so the groups go one by one: b's cut of c's inputs must be renumbered after a's
    assert report.removed == {"a": 1, "b": 1}
    assert "would change the model's outputs" in report.rejected["e"]
    assert net.c.in_channels == 6 and net.a.out_channels == net.b.out_channels == 3
    torch.testing.assert_close(_outputs(net, x), y, rtol=1e-5, atol=1e-6)


def test_renumber_skips_removed_indices():
    cut = surgery.ChannelCut("c", "in", (0, 3, 6, 7))
    assert surgery._renumber(cut, [1, 3, 5]).idxs == (0, 3, 4)  # 3 is gone; 6 and 7 move down by three
    assert surgery._renumber(cut, []) is cut


class Ops(nn.Module):
    """One producer (channel 1 always zero), read through operations that keep or lose its zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(3, 4, 1, bias=False)
        self.consumers = nn.ModuleList(nn.Conv2d(4, 2, 1) for _ in range(9))

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        o = self.other(x)
        views = [
            torch.sigmoid(h),  # sigmoid(0) = 0.5
            h.mean((2, 3), keepdim=True),  # spatial mean: zero stays zero
            h.mean(1, keepdim=True).expand_as(h),  # mean over channels, broadcast back: mixes them
            F.hardtanh(h, 0.5, 1.0),  # a clamp whose range excludes 0
            F.relu6(h),
            h * o,  # a product with a live factor
            h + o,  # a sum with a live term
            F.max_pool2d(h, 2),
            F.gelu(h),
        ]
        return sum(c(v).sum() for c, v in zip(self.consumers, views))


@pytest.mark.parametrize(
    "index, silent",
    [(0, False), (1, True), (2, False), (3, False), (4, True), (5, True), (6, False), (7, True), (8, True)],
)
def test_zero_channels_follow_only_operations_that_keep_zeros(index, silent):
    net = Ops().eval()
    x = torch.randn(2, 3, 4, 4)
    DG = tp.DependencyGraph().build_dependency(net, example_inputs=x)
    silence = surgery._Silence({net.conv: {1}, net.bn: {1}})
    group = DG.get_pruning_group(net.conv, tp.prune_conv_out_channels, [1])
    consumer = net.consumers[index]
    sources = [dep.source for dep, _ in group if dep.target.module is consumer]
    assert sources, "the consumer is coupled with the producer's channel"
    zeros = set().union(*(silence.at(s)[0] for s in sources))
    assert (1 in zeros) is silent


def test_only_a_mean_over_the_spatial_dimensions_counts_as_pooling():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    assert surgery._spatial_mean(x.mean((2, 3), keepdim=True).grad_fn)
    assert surgery._spatial_mean(x.mean((-1, -2)).grad_fn)
    assert surgery._spatial_mean(x[:, :, 0].mean(2).grad_fn)  # (N, C, L)
    assert not surgery._spatial_mean(x.mean(1, keepdim=True).grad_fn)  # over the channels
    assert not surgery._spatial_mean(x.mean((1, 2, 3)).grad_fn)
    assert not surgery._spatial_mean(x[:, :, 0, 0].mean(1).grad_fn)  # (N, C): its only dimension is the channels
