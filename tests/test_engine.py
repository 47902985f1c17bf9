"""Penalty, installation and argument validation of the shared self-compression engine."""

import pytest
import torch
from torch import nn

from lightning_xai.models import LeNet, SmallResNet
from lightning_xai.quantization.engine import SelfCompressor
from lightning_xai.quantization.install import install_quantizers, quantized_layers, remove_quantizers


def test_install_keeps_classes_and_is_idempotent():
    net = LeNet()
    layers = install_quantizers(net)
    assert [q.name for q in layers] == ["features.0", "features.2", "features.5", "classifier.1", "classifier.3"]
    assert isinstance(net.features[0], nn.Conv2d)
    again = install_quantizers(net)
    assert len(again) == len(layers)
    assert sum(1 for n, _ in net.named_parameters() if n.endswith(".b")) == 5


def test_include_exclude_regex():
    net = LeNet()
    layers = install_quantizers(net, include=r"^features", exclude=r"features\.5")
    assert [q.name for q in layers] == ["features.0", "features.2"]


def test_remove_quantizers_bakes_quantized_weights():
    net = LeNet()
    x = torch.randn(3, 1, 8, 8)
    install_quantizers(net, init_bits=3)
    with torch.no_grad():
        quantized_layers(net)[1].quantizer.b[:4] = 0
        y = net(x)
    remove_quantizers(net)
    assert not quantized_layers(net)
    assert "features.0.weight" in dict(net.named_parameters())
    with torch.no_grad():
        assert torch.equal(net(x), y)


def test_penalty_matches_hand_formula():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    sc = SelfCompressor(gamma=0.3, alpha=0.2, init_bits=5)
    sc.install(net)
    layers = quantized_layers(net)
    with torch.no_grad():
        layers[0].quantizer.b.copy_(torch.tensor([1.5, -1.0, 4.0]))
        layers[1].quantizer.b.copy_(torch.tensor([2.0, 0.0, 3.0, 1.0]))
    n0 = 3 * 2 * 9 + 4 * 12
    q = ((1.5 + 0 + 4.0) * 18 + (2 + 0 + 3 + 1) * 12) / n0
    l1 = (
        net[0].parametrizations.weight.original.abs().sum() + net[3].parametrizations.weight.original.abs().sum()
    ) / n0
    terms = sc.penalty()
    assert terms.q.item() == pytest.approx(q)
    assert terms.l1.item() == pytest.approx(l1.item())
    assert terms.total.item() == pytest.approx(0.3 * q + 0.2 * l1.item())


def test_closed_form_penalty_gradient_equals_autograd():
    net = SmallResNet(width=4)
    sc = SelfCompressor(gamma=0.7, alpha=0.05)
    sc.install(net)
    with torch.no_grad():
        for layer in sc.layers:
            layer.quantizer.b.uniform_(-1.0, 6.0)
    _closed_form_matches_autograd(sc, [lay.original for lay in sc.layers])


def _closed_form_matches_autograd(sc, weights=()):
    """``add_penalty_gradients`` gives every ``b`` (and ``weights``) autograd's gradient of ``penalty()``."""
    params = [lay.quantizer.b for lay in sc.layers] + list(weights)
    expected = torch.autograd.grad(sc.penalty().total, params)
    for p in params:
        p.grad = None
    sc.add_penalty_gradients()
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)


def test_cached_channel_weights_follow_shapes_and_relief():
    """The per-channel weights ``n_l / N0`` of the penalty are cached between steps: a consumer that lost inputs
    (``n_l`` shrinks) and a changed relief each rebuild them, so the closed-form gradient keeps matching autograd
    (a stale cache would keep the old ``n_l`` or the old relief)."""
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    sc = SelfCompressor(gamma=0.5)
    sc.install(net)
    _closed_form_matches_autograd(sc)
    # the second layer loses two input columns by hand (what removal does to a consumer): n_l 5 → 3
    plist = net[2].parametrizations.weight
    plist.original = nn.Parameter(plist.original.detach()[:, :3].clone())
    _closed_form_matches_autograd(sc)
    assert sc._weights[5:].tolist() == pytest.approx([3 / 45] * 3)
    with torch.no_grad():
        sc.layers[0].quantizer.relief[1] = 0.25
    _closed_form_matches_autograd(sc)
    assert sc._weights[1].item() == pytest.approx(0.25 * 6 / 45)


def test_cached_channel_weights_follow_a_device_move():
    """After the model moves (here to the meta device; on a GPU a stale CPU cache would fail the step, meta accepts
    it silently, so the cache itself is inspected), the cached weights are rebuilt on the new device."""
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    sc = SelfCompressor(gamma=0.5)
    sc.install(net)
    sc.add_penalty_gradients()
    assert sc._weights.device.type == "cpu"
    net.to("meta")
    sc.add_penalty_gradients()
    assert sc._weights.device.type == "meta"
    assert all(lay.quantizer.b.grad.device.type == "meta" for lay in sc.layers)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": -1.0}, r"`gamma` must be >= 0.0, got -1.0"),
        ({"gamma": "big"}, r"`gamma` must be a number, got 'big'"),
        ({"alpha": float("nan")}, r"`alpha` must be finite"),
        ({"init_bits": 0.5}, r"`init_bits` must be >= 1.0, got 0.5"),
        ({"init_bits": 40}, r"`init_bits` must be <= 32.0, got 40"),
        ({"include": "(["}, r"`include`='\(\[' is not a valid regular expression"),
        ({"exclude": 3}, r"`exclude` must be a regular expression string or None, got int 3"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SelfCompressor(**kwargs)


def test_no_layer_matched_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no layer matched: `include`='nothing'"):
        SelfCompressor(include="nothing").install(LeNet())
