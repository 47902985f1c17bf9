"""Quantizers on Conv1d and attention projections: exact export round trip; removal refuses what it cannot slice."""

import torch
from helpers import kill_channels
from torch import nn

from lightning_xai.pruning.surgery import remove_dead_channels
from lightning_xai.quantization.export import export_compressed, load_compressed
from lightning_xai.quantization.install import install_quantizers, quantized_layers


class TinyAttention(nn.Module):
    def __init__(self, vocab=12, dim=16, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h + self.mlp(h))


class TinyConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14, 3)
        )

    def forward(self, x):
        return self.net(x)


def test_attention_projections_are_quantized_and_export_exactly(tmp_path):
    torch.manual_seed(0)
    net = TinyAttention()
    names = [(q.name, q.tensor) for q in install_quantizers(net, init_bits=4)]
    assert ("attn", "in_proj_weight") in names and ("attn.out_proj", "weight") in names
    kill_channels(quantized_layers(net)[0], [0, 17, 40])  # rows of the q/k/v projection
    tokens = torch.randint(0, 12, (3, 7))
    net.eval()
    with torch.no_grad():
        y = net(tokens)
    export_compressed(net, tmp_path / "m.safetensors")
    fresh = load_compressed(tmp_path / "m.safetensors", TinyAttention()).eval()
    with torch.no_grad():
        assert torch.equal(fresh(tokens), y)


def test_attention_removal_is_refused_not_broken():
    net = TinyAttention()
    layers = install_quantizers(net)
    kill_channels(next(q for q in layers if q.name == "mlp.0"), [1, 2])
    kill_channels(next(q for q in layers if q.name == "attn.out_proj"), [3])
    tokens = torch.randint(0, 12, (2, 5))
    net.eval()
    with torch.no_grad():
        y = net(tokens)
    report = remove_dead_channels(net, tokens)
    assert report.removed.get("mlp.0") == 2 and net.mlp[0].out_features == 30
    assert "attn.out_proj" in report.rejected  # residual stream coupled to embeddings: cannot be sliced here
    with torch.no_grad():
        torch.testing.assert_close(net(tokens), y, rtol=1e-5, atol=1e-6)


def test_conv1d_removal_and_export(tmp_path):
    net = TinyConv1d()
    layers = install_quantizers(net)
    kill_channels(layers[0], [0, 3])
    kill_channels(layers[1], [5])
    x = torch.randn(4, 2, 16)
    with torch.no_grad():
        y = net(x)
    report = remove_dead_channels(net, x)
    assert report.removed == {"net.0": 2, "net.2": 1}
    assert net.net[5].in_features == 7 * 14
    export_compressed(net, tmp_path / "m.safetensors")
    fresh = load_compressed(tmp_path / "m.safetensors", TinyConv1d())
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
        torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)
