"""LRP on modern layers: conservation (float64, bias-free) for every new rule, in-place activations, gates,
normalisations, grouped convolutions, one error for all unsupported nodes, and exact pruning counts with ties."""

import pytest
import torch
from torch import nn

from lightning_xai.attribution.lrp import lrp
from lightning_xai.quantization.mixed import relevance_plan

ACTIVATIONS = [
    nn.ReLU6(),
    nn.LeakyReLU(0.1),
    nn.ELU(),
    nn.SELU(),
    nn.GELU(),
    nn.SiLU(),
    nn.Mish(),
    nn.Hardswish(),
    nn.Hardtanh(),
    nn.Softplus(),
    nn.Tanh(),
    nn.Dropout1d(0.5),
]


def _conserved(model, x, rtol=1e-4):  # the ε = 1e-6 stabiliser of the layer rule leaks a little
    res = lrp(model.double(), x.double())
    total_in, total_out = res.input.sum(), res.output.sum()
    assert torch.isfinite(total_in)
    assert torch.allclose(total_in, total_out, rtol=rtol, atol=1e-9), (float(total_in), float(total_out))
    return res


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: type(a).__name__)
def test_elementwise_activation_identity_rule_conserves(act):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8, bias=False), act, nn.Linear(8, 3, bias=False))
    res = _conserved(net, torch.randn(5, 6))
    # the identity rule: the relevance entering the activation leaves it unchanged
    assert torch.allclose(res.activations["0"], res.activations["1"])


class _SE(nn.Module):
    """conv → squeeze-excitation (torchvision style: ``scale * x``) → pool → linear, no biases anywhere."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(4, 2, 1, bias=False)
        self.fc2 = nn.Conv2d(2, 4, 1, bias=False)
        self.gate = gate
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        h = self.act(self.conv(x))
        scale = self.gate(self.fc2(torch.relu(self.fc1(self.pool(h)))))
        return self.head(self.pool(scale * h).flatten(1))


@pytest.mark.parametrize("gate", [nn.Sigmoid(), nn.Hardsigmoid()], ids=["sigmoid", "hardsigmoid"])
def test_squeeze_excitation_gate_gets_no_relevance(gate):
    torch.manual_seed(0)
    model = _SE(gate)
    res = _conserved(model, torch.rand(3, 2, 6, 6))
    assert all(name not in res.weights or res.weights[name].abs().sum() == 0 for name in ("fc1", "fc2"))
    assert res.weights["conv"].abs().sum() > 0
    assert model.act.inplace  # the in-place flag is given back


def test_in_place_relu_gives_the_same_relevance_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4, bias=False))
    inplace = nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 16, 4, bias=False)
    )
    inplace.load_state_dict(base.state_dict())
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    saved = {k: v.clone() for k, v in inplace.double().state_dict().items()}
    a, b = lrp(base.double(), x), lrp(inplace, x)
    assert torch.allclose(a.input, b.input) and torch.allclose(a.weights["0"], b.weights["0"])
    assert inplace[1].inplace
    assert all(torch.equal(v, saved[k]) for k, v in inplace.state_dict().items())


@pytest.mark.parametrize("norm", ["layer", "rms", "group"])
def test_normalisation_rule_conserves_without_shift(norm):
    torch.manual_seed(0)
    if norm == "group":
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, bias=False),
            nn.GroupNorm(2, 4, affine=False),
            nn.Flatten(),
            nn.Linear(4 * 16, 3, bias=False),
        )
        x = torch.randn(3, 2, 6, 6)
    else:
        layer = nn.LayerNorm(8, bias=False) if norm == "layer" else nn.RMSNorm(8)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
        net = nn.Sequential(nn.Linear(5, 8, bias=False), layer, nn.GELU(), nn.Linear(8, 3, bias=False))
        x = torch.randn(4, 5)
    _conserved(net, x)


def test_functional_layer_norm_with_affine_weight_conserves():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 6, bias=False)
            self.w = nn.Parameter(torch.rand(6) + 0.5)
            self.b = nn.Linear(6, 2, bias=False)

        def forward(self, x):
            return self.b(torch.nn.functional.layer_norm(self.a(x), (6,), self.w, None, 1e-5))

    torch.manual_seed(0)
    _conserved(Net(), torch.randn(3, 5))


@pytest.mark.parametrize("groups", [2, 4], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_convolutions_conserve(groups):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=groups, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 25, 3, bias=False),
    )
    res = _conserved(net, torch.rand(2, 4, 5, 5))
    assert res.weights["0"].shape == net[0].weight.shape


def test_one_error_lists_every_unsupported_node():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.soft = nn.Softmax(-1)
            self.rnn = nn.Softmin(-1)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.exp(self.rnn(self.soft(self.a(x)))))

    net = Net()
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as err:
        lrp(net, torch.rand(2, 4))
    text = str(err.value)
    assert "3 node(s)" in text and "Softmax" in text and "Softmin" in text and "exp" in text
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())


def test_product_of_two_full_tensors_is_refused_clearly():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 2)

        def forward(self, x):
            return self.c(self.a(x) * self.b(x))

    with pytest.raises(ValueError, match="neither factor is a gate"):
        lrp(Net(), torch.rand(2, 4))


def test_relevance_plan_prunes_exactly_the_requested_count_with_ties():
    r = torch.tensor([0.0] * 6 + [1.0, 2.0, 3.0, 4.0])
    plan = relevance_plan(r, prune=0.3)
    assert int((~plan.keep).sum()) == 3  # `r > quantile` would have pruned all six zeros
    r = torch.zeros(100)
    assert int((~relevance_plan(r, prune=0.3).keep).sum()) == 30
    g = torch.Generator().manual_seed(0)
    r = torch.randn(1000, generator=g)  # without ties: the lowest 25 %
    plan = relevance_plan(r, prune=0.25)
    assert int((~plan.keep).sum()) == 250 and r[~plan.keep].max() < r[plan.keep].min()


def test_agrees_with_zennit_on_modern_cnn_layers():
    """An independent implementation: zennit's Epsilon on Linear/Conv (grouped and depthwise included) and its Pass
    rule on activations (the identity rule) give the same input relevance, to float64 rounding."""
    zennit = pytest.importorskip("zennit")
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon as ZEpsilon
    from zennit.rules import Pass
    from zennit.types import Activation

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Hardswish(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 5),
    ).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    ours = lrp(model, x)
    target = model(x).argmax(1)
    composite = LayerMapComposite([(Activation, Pass()), ((nn.Conv2d, nn.Linear), ZEpsilon(1e-6))])
    with Gradient(model, composite) as attributor:
        onehot = torch.nn.functional.one_hot(target, 5).double()
        _, grad = attributor(x.clone().requires_grad_(True), lambda out: out * onehot)
    theirs = grad  # zennit's rules return the relevance itself as the input "gradient"
    assert zennit.__name__ == "zennit"
    assert torch.allclose(ours.input, theirs, rtol=1e-7, atol=1e-12), (ours.input - theirs).abs().max()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_models_are_analysed_and_left_untouched(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).train()
    flags = {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")}
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    res = lrp(model, torch.rand(2, 3, 32, 32))
    assert torch.isfinite(res.input).all() and res.weights
    assert all(torch.isfinite(r).all() for r in res.weights.values())
    assert model.training and {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")} == flags
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
