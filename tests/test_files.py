"""Exported files are verified and loaded with care: a flipped byte anywhere is a clear "corrupted" error, the
loaders accept the LightningModule or its inner module, and another architecture is refused instead of resized."""

import random

import pytest
import torch

from lightning_xai import load_compressed, load_mixed, load_pruned
from lightning_xai.models import ImageClassifier, SmallResNet
from lightning_xai.pruning.units import apply_plan, find_units, save_pruned
from lightning_xai.quantization.export import export_compressed
from lightning_xai.quantization.install import install_quantizers, quantized_layers, remove_quantizers
from lightning_xai.quantization.mixed import apply_weight_plans, export_mixed, uniform_plan


def _compressed(path):
    torch.manual_seed(0)
    model = ImageClassifier("lenet")
    layers = install_quantizers(model, init_bits=5)
    with torch.no_grad():
        layers[1].quantizer.b[:7] = 0.0
    export_compressed(model, path)
    return model, lambda m: load_compressed(path, m)


def _pruned(path):
    torch.manual_seed(0)
    model = ImageClassifier("lenet").eval()
    x = torch.randn(4, 1, 8, 8)
    units, _ = find_units(model, x)
    plan = {units[0].name: [0, 3, 5], units[-1].name: [1, 2]}
    apply_plan(model, units, plan, x)
    save_pruned(model, path, plan)
    return model, lambda m: load_pruned(path, m)[0]


def _mixed(path):
    torch.manual_seed(0)
    model = ImageClassifier("lenet")
    plans = {n: uniform_plan(m.weight, 6) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    export_mixed(model, plans, path)
    apply_weight_plans(model, plans)  # what the file restores
    return model, lambda m: load_mixed(path, m)


WRITERS = {"compressed": _compressed, "pruned": _pruned, "mixed": _mixed}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_random_byte_flips_are_all_refused(kind, tmp_path):
    path = tmp_path / "m.safetensors"
    WRITERS[kind](path)
    good = path.read_bytes()
    rng = random.Random(0)
    positions = rng.sample(range(len(good)), 24)
    for pos in positions:
        flipped = bytearray(good)
        flipped[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="corrupted"):
            _load(kind, path)
    path.write_bytes(good)
    _load(kind, path)  # the intact file still loads


def _load(kind, path):
    fresh = ImageClassifier("lenet")
    if kind == "compressed":
        return load_compressed(path, fresh)
    if kind == "pruned":
        return load_pruned(path, fresh)
    return load_mixed(path, fresh)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_loaders_take_the_lightning_module_or_its_inner_module(kind, tmp_path):
    path = tmp_path / "m.safetensors"
    model, load = WRITERS[kind](path)
    x = torch.randn(5, 1, 8, 8)
    if quantized_layers(model):
        remove_quantizers(model)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    for target in (ImageClassifier("lenet"), ImageClassifier("lenet").net):
        loaded = load(target).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_another_class_count_is_refused(kind, tmp_path):
    path = tmp_path / "m.safetensors"
    _, load = WRITERS[kind](path)
    with pytest.raises(ValueError, match="another architecture"):
        load(ImageClassifier("lenet", num_classes=5))


def test_a_narrower_pruned_model_does_not_load_into_a_wider_one(tmp_path):
    torch.manual_seed(0)
    narrow = SmallResNet(width=8).eval()
    x = torch.randn(4, 1, 8, 8)
    units, _ = find_units(narrow, x)
    plan = {units[0].name: [0, 1]}
    apply_plan(narrow, units, plan, x)
    save_pruned(narrow, tmp_path / "p.st", plan)
    with pytest.raises(ValueError, match="another architecture.*saved from"):
        load_pruned(tmp_path / "p.st", SmallResNet(width=16))
    load_pruned(tmp_path / "p.st", SmallResNet(width=8))  # the same architecture loads
