"""Tied and computed weights.

Tied: one tensor held by two modules (a language model's output layer sharing the embedding's matrix, two layers
sharing one projection). Quantizing, pruning or zeroing it for one holder changes (or, for a quantizer, fails to
change) what the other reads, and a packed file holds one tensor per tie. Computed: weight_norm and spectral_norm
(parametrizations or the deprecated hooks) recompute the weight from latent tensors that the quantizer, the channel
removal and the exports do not know. Every callback leaves such a weight as it is and says so, and the exported model
reloads to the outputs of the trained one."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import (
    AttributionPruning,
    CSWAPPruning,
    LRPCompression,
    SelfCompression,
    load_compressed,
    load_mixed,
    load_pruned,
)
from lightning_xai.quantization.install import fixed_weights, install_quantizers, tied_parameters

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated:FutureWarning")


class TiedLM(pl.LightningModule):
    """Next-token model whose output layer is the embedding's matrix (GPT-2's tying)."""

    def __init__(self, vocab: int = 40, dim: int = 24) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mid(self.emb(tokens))))

    def training_step(self, batch, _):
        t = batch[0]
        return nn.functional.cross_entropy(self(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class TiedMLP(pl.LightningModule):
    """A classifier whose third and fourth layers share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
            nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2),
        )  # fmt: skip
        self.net[6].weight = self.net[4].weight
        self.example_input_array = torch.zeros(2, 16)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _tokens():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 40, (128, 9), generator=g)), batch_size=32)


def _classes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long()), batch_size=64)


def test_tied_parameters_names_every_holder_and_not_a_module_reached_twice():
    model = TiedLM()
    model.alias = model.mid  # one module under two names computes the same thing: not a tie
    assert tied_parameters(model) == {"emb.weight": ["head.weight"], "head.weight": ["emb.weight"]}
    assert fixed_weights(model, ["mid", "head"]) == {"head": "its weight is tied to emb.weight"}


def test_install_leaves_a_tied_weight_in_float_and_warns():
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"head\.weight \(tied to emb\.weight;"):
        layers = install_quantizers(model)
    assert [layer.name for layer in layers] == ["mid"]
    assert not parametrize.is_parametrized(model.head)
    assert model.head.weight is model.emb.weight  # still tied


def test_self_compression_on_a_tied_language_model_reloads_to_the_trained_outputs(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    cb = SelfCompression(gamma=0.05, export_path=str(tmp_path / "lm.safetensors"), log_every_n_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(str(tmp_path), [cb], max_epochs=2).fit(model, _tokens())
    tokens = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = model(tokens)
        mid_codes = model.mid.weight.clone()
    assert not torch.equal(mid_codes, model.mid.parametrizations.weight.original)  # the untied layer is quantized
    reloaded = load_compressed(tmp_path / "lm.safetensors", TiedLM()).eval()
    assert reloaded.head.weight is reloaded.emb.weight
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), expected)
    assert any("left in float, not quantized: head.weight (tied to emb.weight;" in str(w.message) for w in caught)


def test_lrp_compression_leaves_tied_layers_as_they_are_and_its_file_reloads(tmp_path):
    torch.manual_seed(0)
    model = TiedMLP()
    before = {}

    class Record(pl.Callback):  # listed first: sees the weights LRPCompression starts from
        def on_fit_end(self, trainer, pl_module):
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    lrp = LRPCompression(export_path=str(tmp_path / "mixed.safetensors"))
    data = _classes()
    quiet_trainer(str(tmp_path), [Record(), lrp], max_epochs=2, limit_val_batches=1.0).fit(model, data, data)
    assert set(lrp.result["layers"]) == {"net.0", "net.2", "net.8", "net.10"}
    assert torch.equal(model.net[4].weight, before["net.4.weight"])  # the tied tensor is untouched
    assert model.net[6].weight is model.net[4].weight
    assert not torch.equal(model.net[2].weight, before["net.2.weight"])  # the others are compressed
    x = next(iter(data))[0]
    model.eval()
    reloaded = load_mixed(tmp_path / "mixed.safetensors", TiedMLP()).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_attribution_pruning_in_zero_mode_does_not_zero_a_tied_weight(tmp_path):
    torch.manual_seed(0)
    model = TiedMLP()
    cb = AttributionPruning(fraction=0.5, mode="zero")
    data = _classes()
    quiet_trainer(str(tmp_path), [cb], max_epochs=2, limit_val_batches=1.0).fit(model, data, data)
    assert cb.result["candidates"] == ["net.2", "net.8"]
    assert model.net[4].weight.abs().sum() > 0 and model.net[6].weight is model.net[4].weight


NORMS = {
    "weight_norm": lambda layer: torch.nn.utils.parametrizations.weight_norm(layer),
    "spectral_norm": lambda layer: torch.nn.utils.parametrizations.spectral_norm(layer),
    "weight_norm_hook": lambda layer: torch.nn.utils.weight_norm(layer),  # deprecated, still common in audio models
}


class NormedMLP(TiedMLP):
    """The classifier with its third layer under a weight normalisation (and no tie)."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.net[6] = nn.Linear(32, 32)  # untied
        self.net[4] = NORMS[norm](self.net[4])


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_self_compression_leaves_a_normalised_weight_alone_and_reloads_to_the_trained_outputs(tmp_path, norm):
    torch.manual_seed(0)
    model = NormedMLP(norm)
    cb = SelfCompression(gamma=5.0, export_path=str(tmp_path / "m.safetensors"), log_every_n_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(str(tmp_path), [cb], max_epochs=8).fit(model, _classes())
    assert cb.channels_removed > 0  # the other layers still lose channels (the ones feeding net.4 cannot)
    x = next(iter(_classes()))[0]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    reloaded = load_compressed(tmp_path / "m.safetensors", NormedMLP(norm)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
    reason = {"weight_norm": "_WeightNorm", "spectral_norm": "_SpectralNorm", "weight_norm_hook": "WeightNorm hook"}
    message = f"left in float, not quantized: net.4.weight (already parametrized by {reason[norm]};"
    assert any(message in str(w.message) for w in caught)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_lrp_compression_and_attribution_pruning_leave_a_normalised_weight_alone(tmp_path, norm):
    torch.manual_seed(0)
    model = NormedMLP(norm)
    lrp = LRPCompression()
    attr = AttributionPruning(fraction=0.5, mode="zero")
    data = _classes()
    quiet_trainer(str(tmp_path), [attr, lrp], max_epochs=1, limit_val_batches=1.0).fit(model, data, data)
    assert "net.4" not in lrp.result["layers"] and "net.2" in lrp.result["layers"]
    assert "net.4" not in attr.result["candidates"]


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_cswap_prunes_around_a_normalised_layer_and_its_file_reloads(tmp_path, norm):
    torch.manual_seed(0)
    model = NormedMLP(norm)
    cb = CSWAPPruning(target_ratio=0.8, samples_per_class=8, export_path=str(tmp_path / "p.safetensors"))
    data = _classes()
    quiet_trainer(str(tmp_path), [cb], max_epochs=1, limit_val_batches=1.0).fit(model, data, data)
    assert model.net[0].out_features < 32  # pruned where it may be
    assert model.net[4].in_features == model.net[4].out_features == 32  # not around the normalised layer
    x = next(iter(data))[0]
    model.eval()
    reloaded, _ = load_pruned(tmp_path / "p.safetensors", NormedMLP(norm))
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
