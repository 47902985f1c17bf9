"""A forward with further arguments that have defaults — ``forward(x, mask=None, return_features=False)``, as
Hugging Face-style and multi-task models have. The analyses call the model with its input alone, so the defaults
are what runs; torch.fx tracing (LRP, C-SWAP's fast engine) fixes them at their defaults. Before, ``mask`` traced as
a proxy took the ``is not None`` branch (LRP then called ``linear(None)``, C-SWAP's fast engine failed on the missing
argument) and ``if return_features:`` could not be traced at all."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import ClassifierSteps, halves_task, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_xai import CSWAPPruning, LRPCompression
from lightning_xai._fx import symbolic_trace
from lightning_xai.attribution.lrp import lrp


class Net(ClassifierSteps, pl.LightningModule):
    def __init__(self, extras: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.extras = extras
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 16))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(16, 3))
        self.side = nn.Linear(4, 3)  # used only when `side_input` is given

    def forward(self, x, side_input=None, return_features=False, scale=1.0):
        if not self.extras:
            return self.head(self.body(x))
        features = self.body(x) * scale
        logits = self.head(features)
        if side_input is not None:
            logits = logits + self.side(side_input)
        if return_features:
            return logits, features
        return logits


def _data():
    return halves_task(192, 8, 0.2)


def test_tracing_fixes_further_arguments_at_their_defaults():
    model = Net(extras=True).eval()
    gm = symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert "side" not in called and "body.3" in called
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(gm(x), model(x))


def test_lrp_and_cswap_decide_as_for_the_plain_forward():
    x = torch.randn(6, 1, 8, 8)
    plain, extras = Net(extras=False).eval(), Net(extras=True).eval()
    extras.load_state_dict(plain.state_dict())
    a, b = lrp(plain, x), lrp(extras, x)
    assert a.input.abs().sum() > 0 and torch.equal(a.input, b.input)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    runs = {}
    for with_extras in (False, True):
        torch.manual_seed(0)
        model = Net(with_extras)
        cswap = CSWAPPruning(target_ratio=0.7, samples_per_class=8, curves=(), mode="fast")
        data = _data()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(None, [cswap, LRPCompression(prune=0.3)], max_epochs=2, limit_val_batches=1.0).fit(
                model, data, data
            )
        assert not [w for w in caught if "could not trace" in str(w.message)]  # the fast engine ran
        runs[with_extras] = (cswap.plan, {n: v.clone() for n, v in model.state_dict().items()})
    assert runs[True][0] == runs[False][0] and runs[True][0]
    assert all(torch.equal(runs[True][1][n], v) for n, v in runs[False][1].items())


def test_a_further_argument_without_a_default_is_still_refused():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x, y):
            return self.a(x) + self.a(y)

    with pytest.raises(ValueError, match="`forward` argument `y` has no default"):
        lrp(Two(), torch.randn(2, 3))


class _DictSamples(torch.utils.data.Dataset):
    """``{"x", "side_input", "id", "y"}`` samples: ``side_input`` is an argument of ``Net.forward``, ``id`` is not."""

    def __init__(self, loader):
        self.base = loader.dataset

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"x": x, "side_input": torch.zeros(4), "id": i, "y": y}


class _DictNet(Net):
    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch["x"], batch["side_input"]), batch["y"])


def test_dict_samples_with_a_forward_argument_get_a_warning_at_training_start(monkeypatch):
    """The analyses call ``forward`` with the input alone: a Hugging Face ``attention_mask`` in the samples is not
    passed, which no error would show. Only keys that ``forward`` takes are named."""
    import lightning_xai.callbacks._data as data_module

    said: list[str] = []
    monkeypatch.setattr(data_module, "rank_zero_warn", lambda message, *a, **k: said.append(message))
    loader = DataLoader(_DictSamples(_data()), batch_size=32)
    cswap = CSWAPPruning(target_ratio=0.7, samples_per_class=8, curves=())
    quiet_trainer(None, [cswap], max_epochs=1, limit_val_batches=1.0).fit(_DictNet(True), loader, loader)
    assert len(said) == 2  # the train (analysis) split and the val split
    assert all("hold ['side_input'], which the model's forward takes" in m and "'id'" not in m for m in said)
    assert cswap.plan  # a warning, not a refusal
