"""Recipes run in quick mode; data modules are deterministic, stratified and fail clearly offline."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_xai.data import DigitsDataModule, VisionDataModule, make_datamodule
from lightning_xai.models import MLP, LeNet, SmallResNet, build_model

ROOT = Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_self_compress_recipe_quick(tmp_path, capsys):
    recipe = _load(ROOT / "recipes" / "self_compress.py")
    summary = recipe.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "TensorBoard logs:" in out and "Packed model:" in out
    assert json.loads(out.strip().splitlines()[-1]) == summary
    assert Path(summary["export"]).is_file()
    assert summary["bits_ratio"] < 0.25
    assert list(Path(summary["tensorboard"]).glob("events.out.tfevents.*"))


def test_digits_split_is_stratified_disjoint_and_deterministic():
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    a.setup()
    b.setup()
    for split in ("train", "val", "test"):
        assert np.array_equal(a.indices[split], b.indices[split])
    tr, va, te = (set(a.indices[s].tolist()) for s in ("train", "val", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr) + len(va) + len(te) == 1797
    counts = torch.bincount(a.dataset("test").tensors[1], minlength=10)
    assert counts.min() >= 33 and counts.max() <= 38  # stratified: ~36 per class
    c = DigitsDataModule(seed=4)
    c.setup()
    assert not np.array_equal(a.indices["test"], c.indices["test"])


def test_epoch_order_depends_only_on_seed_and_epoch():
    dm = DigitsDataModule(seed=1)
    dm.setup()
    s1, s2 = dm.train_dataloader().sampler, dm.train_dataloader().sampler
    s1.set_epoch(5)
    s2.set_epoch(5)
    torch.manual_seed(99)
    assert list(s1) == list(s2)
    s2.set_epoch(6)
    assert list(s1) != list(s2)


def test_vision_offline_error_names_data_dir(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, download=False, **kwargs):
        if download:
            raise OSError("network is unreachable")
        raise RuntimeError("Dataset not found")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    dm = VisionDataModule("mnist", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"mnist was not found under `data_dir`=.*--data-dir DIR"):
        dm.setup()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_datamodule("imagenet"), r"`dataset` must be one of \['digits', 'mnist'"),
        (lambda: make_datamodule("mnist"), r"`data_dir` is required for dataset 'mnist'"),
        (lambda: VisionDataModule("svhn", "x"), r"`name` must be one of"),
        (lambda: DigitsDataModule(batch_size=0), r"`batch_size` must be >= 1, got 0"),
        (lambda: DigitsDataModule(test_fraction=0.9), r"`test_fraction` must be <= 0.5, got 0.9"),
        (
            lambda: build_model("vgg", (1, 8, 8)),
            r"`model` must be one of \['lenet', 'mlp', 'resnet', 'char_transformer', 'lenet300100', 'lenet5caffe'\], "
            r"got 'vgg'",
        ),
        (lambda: build_model("lenet", (64,)), r"`model`='lenet' needs image inputs"),
    ],
)
def test_invalid_data_and_model_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("net", "x"),
    [
        (LeNet(1, 10, 28), torch.zeros(2, 1, 28, 28)),
        (LeNet(3, 10, 32), torch.zeros(2, 3, 32, 32)),
        (MLP(64, 10), torch.zeros(2, 64)),
        (SmallResNet(3, 10, width=8, blocks=2), torch.zeros(2, 3, 32, 32)),
    ],
)
def test_reference_models_shapes(net, x):
    assert net(x).shape == (2, 10)


def test_the_package_root_exports_the_public_api():
    import lightning_xai
    from lightning_xai import (
        AttributionPruning,
        CompressionMixin,
        CSWAPPruning,
        LRPCompression,
        MNISTDataModule,
        PreservationGuard,
        SelfCompression,
        load_compressed,
        load_mixed,
        load_pruned,
    )
    from lightning_xai.callbacks.self_compression import SelfCompression as Deep
    from lightning_xai.quantization.export import load_compressed as deep_loader

    assert SelfCompression is Deep and load_compressed is deep_loader  # one implementation, two addresses
    exported = {n: getattr(lightning_xai, n) for n in lightning_xai.__all__}
    for obj in (AttributionPruning, CompressionMixin, CSWAPPruning, LRPCompression, MNISTDataModule):
        assert obj in exported.values()
    assert {PreservationGuard, load_mixed, load_pruned} <= set(exported.values())


@pytest.mark.parametrize("task", ["digits", "names"])
def test_safe_compress_recipe_quick(tmp_path, capsys, task):
    recipe = _load(ROOT / "recipes" / "safe_compress.py")
    summary = recipe.main(["--quick", "--task", task, "--out", str(tmp_path)])
    assert Path(summary["export"]).is_file()
    assert summary["preservation_set"] > 0 and summary["preservation_acc"] >= summary["threshold"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary


def test_cswap_recipe_quick(tmp_path, capsys):
    recipe = _load(ROOT / "recipes" / "cswap_prune.py")
    summary = recipe.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "TensorBoard logs:" in out and "Pruned model:" in out
    assert json.loads(out.strip().splitlines()[-1]) == summary
    assert Path(summary["export"]).is_file()
    assert summary["params_after"] <= 0.5 * summary["params_before"] + 1
    assert set(summary["sauce"]) == {"cswap", "omp", "random"}


def test_layer_prune_recipe_quick(tmp_path, capsys):
    recipe = _load(ROOT / "recipes" / "layer_prune.py")
    summary = recipe.main(["--quick", "--mode", "bypass", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "TensorBoard logs:" in out and json.loads(out.strip().splitlines()[-1]) == summary
    assert len(summary["pruned"]["gradxact"]) == 1 and -1 <= summary["spearman"] <= 1


def test_lrp_recipe_quick(tmp_path, capsys):
    recipe = _load(ROOT / "recipes" / "lrp_compress.py")
    summary = recipe.main(["--quick", "--relevance", "absolute", "--prune", "0.3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Packed model:" in out and json.loads(out.strip().splitlines()[-1]) == summary
    assert Path(summary["export"]).is_file() and summary["size_ratio"] < 0.36
    assert summary["test_acc_reloaded"] > 0


def _readme_tags(callback: str) -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2] == callback and cells[1] in ("scalar", "histogram", "image", "text"):
            for tag in re.findall(r"`([^`]+)`", cells[0]):
                rows.append((tag, cells[1]))
    return rows


def test_main_command_writes_every_documented_tag(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = _load(ROOT / "recipes" / "self_compress.py")
    summary = recipe.main(["--quick", "--out", str(tmp_path)])
    acc = EventAccumulator(
        summary["tensorboard"], size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    ).Reload()
    tags = acc.Tags()
    kinds = {
        "scalar": tags["scalars"],
        "histogram": tags["histograms"],
        "image": tags["images"],
        "text": tags["tensors"],
    }
    documented = _readme_tags("SelfCompression")
    assert len(documented) >= 12
    for tag, kind in documented:
        present = kinds[kind]
        if "{layer}" in tag:
            prefix = tag.split("{layer}")[0]
            assert any(t.startswith(prefix) for t in present), (tag, kind)
        else:
            assert any(t == tag or t.startswith(tag + "/") for t in present), (tag, kind, sorted(present)[:20])
    image = acc.Images("compression/bits_heatmap")[-1]
    assert image.width > 100 and image.height > 50 and image.encoded_image_string[:4] == b"\x89PNG"


def test_chain_recipe_combines_everything_in_one_run(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = _load(ROOT / "recipes" / "chain.py")
    summary = recipe.main(["--quick", "--out", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["reload_matches"] and summary["test_acc_reloaded"] == summary["test_acc"]
    assert summary["bits_ratio"] < 0.5 and summary["cswap_params_ratio"] < 1.0
    acc = EventAccumulator(summary["tensorboard"], size_guidance={"images": 0, "scalars": 0}).Reload()
    images = set(acc.Tags()["images"])
    assert {"compression/bits_heatmap", "preservation/gradcam", "pruning/curves", "pruning/categories"} <= images
    assert {"preservation/accuracy", "compression/bits_ratio", "pruning/sauce/cswap"} <= set(acc.Tags()["scalars"])


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "recipes" / "configs").glob("*.yaml")))
def test_every_lightning_cli_config_runs(tmp_path, monkeypatch, config):
    cli = _load(ROOT / "recipes" / "cli.py")
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "recipes" / "configs" / config)]
    args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.enable_progress_bar=false"]
    result = cli.main(args)
    assert result.trainer.state.finished
    logs = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert logs, "each config logs to TensorBoard under runs/"


def test_names_is_an_optional_extra_with_a_clear_error(monkeypatch):
    from lightning_xai.data.names import load_census_names

    monkeypatch.setitem(sys.modules, "names", None)  # as if `names` were not installed
    with pytest.raises(ImportError, match=r"pip install 'lightning_xai\[names\]'"):
        load_census_names()


def test_mnist_datamodule_reads_a_small_folder_and_validates_its_splits(tmp_path):
    """A folder of gzipped IDX files in torchvision's layout (as ../shared/data ships them): decompressed in place,
    a seeded, stratified validation split carved from the training images, the test set untouched."""
    import gzip

    import numpy as np

    from lightning_xai import MNISTDataModule

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"train": 120, "t10k": 40}
    for split, n in sizes.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(raw / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + images.tobytes())
        with gzip.open(raw / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
    dm = MNISTDataModule(tmp_path, batch_size=16, seed=3)
    dm.setup()
    assert (raw / "train-images-idx3-ubyte").is_file()  # decompressed into the folder
    assert {s: len(dm.dataset(s)) for s in ("train", "val", "test")} == {"train": 110, "val": 10, "test": 40}
    assert not set(dm.indices["train"]) & set(dm.indices["val"])
    assert sorted(dm.dataset("val").tensors[1].tolist()) == list(range(10))  # stratified: one image per class
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    again = MNISTDataModule(tmp_path, seed=3)
    again.setup()
    assert np.array_equal(again.indices["val"], dm.indices["val"])  # seeded
    with pytest.raises(ValueError, match="`val_size`=120 leaves no training images"):
        MNISTDataModule(tmp_path, val_size=120).setup()


def test_a_recipe_without_training_data_fails_instead_of_exporting(tmp_path):
    import gzip

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):  # one image each: nothing left to train on after the validation split
        with gzip.open(raw / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (1, 28, 28)) + bytes(784))
        with gzip.open(raw / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + (1).to_bytes(4, "big") + bytes(1))
    recipe = _load(ROOT / "recipes" / "self_compress.py")
    with pytest.raises(ValueError, match="leaves no training images"):
        recipe.main(["--quick", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path)])
    assert not list(tmp_path.rglob("*.safetensors"))
