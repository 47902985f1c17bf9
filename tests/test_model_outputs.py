"""Models whose forward returns more than a tensor: a dict with ``logits`` (Hugging Face's ``ModelOutput`` is one) or
a tuple whose first element is the class scores (``class_scores`` also reads an object's ``logits`` attribute). Every
analysis that reads class scores (accuracy, the guard's loss and selection, C-SWAP's σ, layer scores, Grad-CAM) takes
them out the same way and decides exactly what it decides for the same network returning the bare tensor."""

from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import ClassifierSteps, halves_task, quiet_trainer
from torch import nn

from lightning_xai import AttributionPruning, CSWAPPruning, LRPCompression, PreservationGuard, SelfCompression
from lightning_xai.attribution.lrp import lrp
from lightning_xai.evaluation import class_scores
from lightning_xai.preservation.scores import gradcam_scores


def test_class_scores_takes_the_logits_out_of_every_usual_output():
    t = torch.randn(4, 3)
    assert class_scores(t) is t
    assert class_scores({"loss": torch.zeros(()), "logits": t}) is t
    assert class_scores(SimpleNamespace(logits=t, hidden_states=None)) is t
    assert class_scores((t, torch.zeros(4, 8))) is t
    with pytest.raises(TypeError, match=r"returned str; this analysis needs class scores"):
        class_scores("logits")
    with pytest.raises(TypeError, match=r"returned dict"):
        class_scores({"scores": t})


class Net(ClassifierSteps, pl.LightningModule):
    """A CNN classifier whose forward returns ``kind``: a tensor, a dict, an object or a tuple."""

    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        self.kind = kind
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x):
        logits = self.head(self.features(x))
        probs = logits.softmax(-1)
        if self.kind == "dict":
            return {"logits": logits, "probs": probs}
        if self.kind == "object":
            return SimpleNamespace(logits=logits, probs=probs)
        if self.kind == "tuple":
            return logits, probs
        return logits


def _data():
    return halves_task(192, 8, 0.2)


def _fit(kind, callbacks, epochs=2):
    torch.manual_seed(0)
    model = Net(kind)
    data = _data()
    quiet_trainer(None, callbacks, max_epochs=epochs, limit_val_batches=1.0).fit(model, data, data)
    return model


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_fit_end_analyses_decide_as_for_the_bare_tensor(kind):
    runs = {}
    for k in ("tensor", kind):
        cswap = CSWAPPruning(target_ratio=0.8, samples_per_class=8, curves=())
        layers = AttributionPruning(fraction=0.34, mode="zero")
        model = _fit(k, [cswap, layers])
        runs[k] = (cswap.plan, layers.result["pruned"], {n: v.clone() for n, v in model.state_dict().items()})
    assert runs[kind][0] == runs["tensor"][0] and runs[kind][0]  # C-SWAP's channels
    assert runs[kind][1] == runs["tensor"][1]  # the layer chosen
    assert all(torch.equal(runs[kind][2][n], v) for n, v in runs["tensor"][2].items())


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_the_guard_selects_and_restores_as_for_the_bare_tensor(kind):
    runs = {}
    for k in ("tensor", kind):
        guard = PreservationGuard(fraction=0.1, check_every_n_steps=2)
        model = _fit(k, [SelfCompression(gamma=0.5, log_every_n_steps=0), guard], epochs=3)
        runs[k] = (guard.indices, guard.restorations, {n: v.clone() for n, v in model.state_dict().items()})
    assert runs[kind][0] is not None and np.array_equal(runs[kind][0], runs["tensor"][0])
    assert runs[kind][1] == runs["tensor"][1]
    assert all(torch.equal(runs[kind][2][n], v) for n, v in runs["tensor"][2].items())


def test_gradcam_reads_the_logits_of_a_dict_output():
    torch.manual_seed(0)
    plain, wrapped = Net("tensor").eval(), Net("dict").eval()
    wrapped.load_state_dict(plain.state_dict())
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.equal(gradcam_scores(wrapped, x, y), gradcam_scores(plain, x, y))


class FeatureNet(Net):
    """Returns its pooled features (``"features"``) or its last hidden layer (``"hidden"``) next to the logits, as
    models trained with a feature loss, or read by a probe, do."""

    def forward(self, x):
        features = self.features(x)
        hidden = self.head[:4](features)
        logits = self.head[4](hidden)
        if self.kind == "features":
            return {"logits": logits, "features": features}
        if self.kind == "hidden":
            return logits, hidden
        return SimpleNamespace(logits=logits, features=features)


@pytest.mark.parametrize(("kind", "producer", "width"), [("features", "features.2", 32), ("hidden", "head.2", 16)])
def test_cswap_keeps_a_returned_intermediate_tensor_whole(kind, producer, width):
    """C-SWAP leaves the channels of a returned intermediate tensor alone (they are model outputs) and prunes the
    rest. Before, torch-pruning took them for inner channels (it marks as an output only a tensor's last operation
    it has not met on another output's path), C-SWAP pruned them, the returned tensor changed width, and the check
    after the removal restored the model at fit end with an error."""
    torch.manual_seed(0)
    model = FeatureNet(kind)
    cswap = CSWAPPruning(target_ratio=0.8, samples_per_class=8, curves=())
    data = _data()
    quiet_trainer(None, [cswap], max_epochs=2, limit_val_batches=1.0).fit(model, data, data)
    assert "model outputs" in cswap.result["refused"][producer]
    assert producer not in cswap.plan and cswap.plan  # something else was pruned
    out = model(torch.zeros(2, 1, 8, 8))
    returned = out["features"] if kind == "features" else out[1]
    assert returned.shape == (2, width)


def test_cswap_reads_an_object_output():
    torch.manual_seed(0)
    model = FeatureNet("object")
    cswap = CSWAPPruning(target_ratio=0.8, samples_per_class=8, curves=())
    data = _data()
    quiet_trainer(None, [cswap], max_epochs=2, limit_val_batches=1.0).fit(model, data, data)
    assert cswap.plan and "features.2" not in cswap.plan
    assert model(torch.zeros(2, 1, 8, 8)).features.shape == (2, 32)


class PlainNet(Net):
    """The same network returning its logits bare, in a dict next to its pooled features, or first in a tuple (no
    softmax in the forward: LRP explains the logits)."""

    def forward(self, x):
        features = self.features(x)
        logits = self.head(features)
        if self.kind == "dict":
            return {"logits": logits, "features": features}
        if self.kind == "tuple":
            return logits, features
        return logits


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_lrp_explains_the_logits_of_a_dict_or_tuple_output(kind):
    """LRP starts its relevance at the logits (the returned features carry none) and gets the bare tensor's
    relevances exactly; ``LRPCompression`` then plans and compresses exactly as for the bare tensor. Before, both
    refused: "LRP needs a model whose output is a (batch, classes) tensor"."""
    torch.manual_seed(0)
    plain, wrapped = PlainNet("tensor").eval(), PlainNet(kind).eval()
    wrapped.load_state_dict(plain.state_dict())
    x = torch.randn(6, 1, 8, 8)
    a, b = lrp(plain, x), lrp(wrapped, x)
    assert torch.equal(a.input, b.input) and a.weights.keys() == b.weights.keys() and a.input.abs().sum() > 0
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    runs = {}
    for k in ("tensor", kind):
        torch.manual_seed(0)
        model = PlainNet(k)
        data = _data()
        quiet_trainer(None, [LRPCompression(prune=0.3)], max_epochs=2, limit_val_batches=1.0).fit(model, data, data)
        runs[k] = {n: v.clone() for n, v in model.state_dict().items()}
    assert runs[kind].keys() == runs["tensor"].keys()
    assert all(torch.equal(runs[kind][n], v) for n, v in runs["tensor"].items())
