"""Bypassing whole residual sublayers (``x + f(x)`` → ``x``): found from the autograd graph, checked against the same
model with the branch output zeroed by a hook (the independent reference), undone exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_xai.pruning.layer_pruning import (
    ZeroBranch,
    prune_layers,
    residual_branch_ends,
    undo_layer_pruning,
)


def _zeroed(model: nn.Module, module_name: str, x: torch.Tensor) -> torch.Tensor:
    """The model's output with ``module_name``'s output replaced by zeros (a forward hook)."""

    def hook(mod, args, out):
        return (torch.zeros_like(out[0]), None) if isinstance(out, tuple) else torch.zeros_like(out)

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_vit_mlp_sublayer_bypassed_whole():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    ).eval()
    nn.init.normal_(vit.heads.head.weight)
    x = torch.randn(3, 3, 16, 16)
    names = ["encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_0.mlp.3"]
    ends = residual_branch_ends(vit, x, names)
    assert list(ends) == ["encoder.layers.encoder_layer_0.mlp.3"]  # the MLP's first layer does not end a branch
    ((member, replacement),) = ends["encoder.layers.encoder_layer_0.mlp.3"]
    assert member == "encoder.layers.encoder_layer_0.mlp" and isinstance(replacement, ZeroBranch)
    expected = _zeroed(vit, member, x)
    with torch.no_grad():
        before = vit(x)
    saved = _state(vit)
    record = prune_layers(vit, ["encoder.layers.encoder_layer_0.mlp.3"], "bypass", x)
    assert record.removed_modules == [member]
    with torch.no_grad():
        torch.testing.assert_close(vit(x), expected, rtol=0, atol=0)
        assert not torch.allclose(vit(x), before)
    assert not any("encoder_layer_0.mlp" in k for k in vit.state_dict())  # its parameters are gone
    undo_layer_pruning(vit, record)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in saved.items())


def test_transformer_encoder_layer_feed_forward_emptied():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.1, batch_first=True)
    net = nn.Sequential(nn.Linear(6, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten())
    net.eval()
    x = torch.randn(2, 5, 6)
    ends = residual_branch_ends(net, x, ["1.layers.0.linear1", "1.layers.0.linear2", "1.layers.1.linear2"])
    assert set(ends) == {"1.layers.0.linear2", "1.layers.1.linear2"}
    assert [m for m, _ in ends["1.layers.0.linear2"]] == ["1.layers.0.linear1", "1.layers.0.linear2"]
    expected = _zeroed(net, "1.layers.0.linear2", x)  # linear2's output is the whole feed-forward branch
    record = prune_layers(net, ["1.layers.0.linear2"], "bypass", x)
    ff = net[1].layers[0]
    assert ff.linear1.out_features == 0 and ff.linear2.in_features == 0
    with torch.no_grad():  # eval + no grad: PyTorch's fused encoder fast path, with an empty feed-forward
        torch.testing.assert_close(net(x), expected, rtol=1e-6, atol=1e-6)
    with torch.enable_grad():  # the regular path agrees
        torch.testing.assert_close(net(x).detach(), expected, rtol=1e-6, atol=1e-6)
    undo_layer_pruning(net, record)
    assert net[1].layers[0].linear1.out_features == 32


class _TwoInputs(nn.Module):
    """``f(h₁) + g(h₂)`` over two halves of one projection: an addition of two sublayers, but no residual (neither
    summand is what the other sublayer reads)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Linear(8, 8)
        self.f = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
        self.g = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
        self.h = nn.Linear(4, 2)

    def forward(self, x):
        h = self.p(x)
        return self.h(self.f(h[:, :4]) + self.g(h[:, 4:]))


def test_additions_without_a_residual_are_not_branches():
    torch.manual_seed(2)
    net = _TwoInputs()
    assert residual_branch_ends(net, torch.randn(3, 8), ["f.0", "f.2", "g.0", "g.2"]) == {}
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert residual_branch_ends(plain, torch.randn(3, 4), ["0", "2"]) == {}
    with pytest.raises(ValueError, match="do not end a residual branch"):
        prune_layers(plain, ["0"], "bypass", torch.randn(3, 4))


def test_gated_branches_are_not_bypassed():
    class Gated(nn.Module):  # x + f(x) * sigmoid(g(x)): the branch end is a product of two computed tensors
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)
            self.g = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.f(x) * torch.sigmoid(self.g(x))

    assert residual_branch_ends(Gated(), torch.randn(2, 4), ["f", "g"]) == {}
