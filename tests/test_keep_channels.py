"""``keep_channels``: layers whose death would cut the output keep their strongest channel; dead layers are named."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer

from lightning_xai import SelfCompression
from lightning_xai.data import DigitsDataModule
from lightning_xai.models import ImageClassifier
from lightning_xai.models.nets import MLP, SmallResNet
from lightning_xai.quantization.install import install_quantizers
from lightning_xai.quantization.keep import StrongestHold, dead_layers, output_cutting_layers


def _naive_hold(bits, floor):
    out = []
    for b in bits:
        b = b.clone()
        top = max(b.tolist())
        for i in range(len(b)):
            if b[i].item() == top:
                b[i] = max(b[i].item(), floor)
        out.append(b)
    return out


def test_strongest_hold_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        bits = [torch.randn(int(n), generator=g) * 3 for n in torch.randint(1, 9, (5,), generator=g)]
        if trial % 3 == 0:
            bits[0][:] = -1.0  # a dead layer with ties: every tied channel is raised
        expected = _naive_hold(bits, 2.0)
        StrongestHold(2.0)(bits)
        for got, want in zip(bits, expected):
            assert torch.equal(got, want)


def test_strongest_hold_follows_new_shapes():
    hold = StrongestHold(1.0)
    bits = [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0])]
    hold(bits)
    assert bits[0].tolist() == [1.0, -2.0] and bits[1].tolist() == [1.0]
    bits = [torch.tensor([-5.0]), torch.tensor([0.5, -3.0, 4.0])]  # after a removal: other sizes
    hold(bits)
    assert bits[0].tolist() == [1.0] and bits[1].tolist() == [0.5, -3.0, 4.0]


def test_output_cutting_layers_plain_stack_and_residual_network():
    torch.manual_seed(0)
    mlp = MLP(64, 10)
    layers = install_quantizers(mlp, None, None, 8.0)
    x = torch.randn(6, 64)
    assert output_cutting_layers(mlp, layers, ((x,), {})) == [layer.name for layer in layers]

    net = SmallResNet(1, 10, width=4)
    layers = install_quantizers(net, None, None, 8.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cut = output_cutting_layers(net.train(), layers, ((torch.randn(5, 1, 8, 8),), {}))
    assert cut == ["stem.0", "fc"]  # a residual branch (or a projection shortcut) can die, the stem and head not
    assert net.training  # mode and weights as they were
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert output_cutting_layers(net, layers, ((torch.randn(1, 1, 8, 8),), {})) is None  # one sample: cannot tell


def _fit(tmp_path, keep):
    pl.seed_everything(0)
    model = ImageClassifier("mlp")
    sc = SelfCompression(gamma=200.0, keep_channels=keep, remove_every_n_steps=10, log_every_n_steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, [sc], max_epochs=2).fit(model, DigitsDataModule())
    return model, sc, [str(w.message) for w in caught]


def _alive(sc):
    return {layer.name: int(layer.quantizer.b.shape[0]) for layer in sc.compressor.layers}


def test_huge_gamma_with_the_defaults_keeps_the_output_connected(tmp_path):
    model, sc, messages = _fit(tmp_path, "cut")
    assert sc._held == [layer.name for layer in sc.compressor.layers]  # an MLP: every layer cuts the output
    assert dead_layers(sc.compressor.layers) == []
    for layer in sc.compressor.layers:
        assert layer.quantizer.b.max() >= 2.0
    assert all(count >= 1 for count in _alive(sc).values()), _alive(sc)  # removal kept a real channel per layer
    assert not any("reached 0 bits" in m for m in messages)


def test_huge_gamma_without_keeping_warns_and_names_the_layer(tmp_path):
    model, sc, messages = _fit(tmp_path, "none")
    assert dead_layers(sc.compressor.layers)
    dead = [m for m in messages if "reached 0 bits" in m]
    assert dead, messages
    assert any("'net." in m for m in dead)
    assert len(dead) == len(set(dead))  # once per layer


def test_keep_channels_is_validated():
    with pytest.raises(ValueError, match="keep_channels"):
        SelfCompression(keep_channels="yes")
    with pytest.raises(ValueError, match="keep_channels"):
        SelfCompression(keep_channels=True)
