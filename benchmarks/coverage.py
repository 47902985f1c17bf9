"""Coverage matrix: every callback on models nobody here wrote (torchvision's zoo, transformers, a tabular MLP).

Rows: torchvision resnet18, resnet50, mobilenet_v2, mobilenet_v3_small, efficientnet_b0, convnext_tiny, a small
``VisionTransformer``, swin_t (untrained, 32×32 inputs, 2 classes: see ``IMAGE_CLASSES``), Lightning's demo
``Transformer`` (as a next-token classifier: the logits of the last position), a tabular MLP (scikit-learn's
``make_classification``) and the library's ``CharTransformer`` on the census names. Columns: SelfCompression (a
large γ, periodic and fit-end removal, export → reload), PreservationGuard (with SelfCompression), CSWAPPruning,
AttributionPruning ``zero``/``bypass``, LRPCompression — each callback with its defaults except where the column
says otherwise.

Each cell is ``ran`` (with its key number), ``refused`` (the library raised a clear ``ValueError`` before changing
the model; the model is checked unchanged) or ``failed`` (anything else: another exception, a model changed by a
refusal, an export that does not reload exactly). The data are synthetic but learnable (class templates plus noise)
except for the names; the point is that every callback runs on every architecture, not accuracy.

For SelfCompression the cell also reports the fraction of 0-bit output channels that were removed physically, split
into the ones that can be removed exactly (MLP hidden units, whole attention heads, convolution channels outside
normalised residual streams) and all of them; ``--quick`` runs fewer steps on smaller inputs. Prints one line per
cell and a final JSON line; the full run rewrites the ``coverage`` section of BENCHMARKS.md and the README table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import quiet_trainer, replace_section  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from lightning_xai import (  # noqa: E402
    AttributionPruning,
    CSWAPPruning,
    LRPCompression,
    PreservationGuard,
    SelfCompression,
)
from lightning_xai.data.digits import InMemorySplits, stratified_split  # noqa: E402
from lightning_xai.models import ImageClassifier  # noqa: E402
from lightning_xai.quantization.export import load_compressed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "results" / "coverage.jsonl"  # the last full-mode result of every cell
MLP_FIRST = ("linear1", "mlp.0")  # the hidden (first) linear of transformer MLP blocks
# two classes for the image rows: C-SWAP's analysis runs the suffix on every analysis sample (samples_per_class ×
# classes) for every batch of neurons, which on 2 CPU cores decides whether ConvNeXt-T and Swin-T take minutes or hours
IMAGE_CLASSES = 2
CALLBACKS = ["self_compression", "guard", "cswap", "attr_zero", "attr_bypass", "lrp"]


class TensorSplits(InMemorySplits):
    """Stratified splits of in-memory tensors (the benchmark's data)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, num_classes: int, seed: int = 0) -> None:
        super().__init__(batch_size, 0.15, 0.15, seed)
        self._x, self._y = x, y
        self.num_classes = num_classes

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        self.indices = stratified_split(self._y.numpy(), self.val_fraction, self.test_fraction, self.seed)
        for split, ids in self.indices.items():
            sel = torch.from_numpy(ids)
            self._data[split] = TensorDataset(self._x[sel], self._y[sel])


def _templates(n: int, shape: tuple[int, ...], classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic inputs: a random template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, *shape, generator=g)
    y = torch.arange(n) % classes
    x = templates[y] + 0.8 * torch.randn(n, *shape, generator=g)
    return x, y


class NextToken(nn.Module):
    """Lightning's demo ``Transformer`` as a classifier: the (log-softmax) scores of the token after the sequence."""

    def __init__(self, vocab: int = 40) -> None:
        super().__init__()
        from lightning.pytorch.demos.transformer import Transformer

        self.vocab = vocab
        self.lm = Transformer(vocab_size=vocab, ninp=32, nhead=4, nhid=64, nlayers=2, dropout=0.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(tokens, tokens).view(tokens.shape[0], tokens.shape[1], self.vocab)[:, -1]


def _next_token_data(n: int, vocab: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of a few arithmetic progressions mod ``vocab``; the label is the next token."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n,), generator=g)
    step = torch.randint(1, 4, (n,), generator=g)
    seq = (start[:, None] + step[:, None] * torch.arange(length + 1)) % vocab
    return seq[:, :-1], seq[:, -1]


def _tabular_mlp(features: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, classes),
    )  # fmt: skip


def models(quick: bool) -> dict[str, Callable[[], tuple[nn.Module, TensorSplits]]]:
    """name -> builder of (fresh untrained model, data module)."""
    import torchvision.models as tvm

    n_img = 160 if quick else 400
    side = 32

    def image(builder):
        def make():
            torch.manual_seed(0)
            x, y = _templates(n_img, (3, side, side), IMAGE_CLASSES, seed=0)
            return builder(), TensorSplits(x, y, 16, IMAGE_CLASSES)

        return make

    def names():
        from lightning_xai.data import NamesDataModule
        from lightning_xai.models.char_transformer import CharTransformer

        torch.manual_seed(0)
        return CharTransformer(num_classes=2, dim=32, heads=4, depth=2), NamesDataModule(batch_size=32)

    def demo():
        torch.manual_seed(0)
        x, y = _next_token_data(400, 40, 8, seed=0)
        return NextToken(40), TensorSplits(x, y, 16, 40)

    def tabular():
        from sklearn.datasets import make_classification

        torch.manual_seed(0)
        x, y = make_classification(n_samples=600, n_features=20, n_informative=10, n_classes=4, random_state=0)
        x = (x - x.mean(0)) / x.std(0)
        return _tabular_mlp(20, 4), TensorSplits(
            torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), 32, 4
        )

    return {
        "resnet18": image(lambda: tvm.resnet18(num_classes=IMAGE_CLASSES)),
        "resnet50": image(lambda: tvm.resnet50(num_classes=IMAGE_CLASSES)),
        "mobilenet_v2": image(lambda: tvm.mobilenet_v2(num_classes=IMAGE_CLASSES)),
        "mobilenet_v3_small": image(lambda: tvm.mobilenet_v3_small(num_classes=IMAGE_CLASSES)),
        "efficientnet_b0": image(lambda: tvm.efficientnet_b0(num_classes=IMAGE_CLASSES)),
        "convnext_tiny": image(lambda: tvm.convnext_tiny(num_classes=IMAGE_CLASSES)),
        "vit_small": image(
            lambda: tvm.VisionTransformer(
                image_size=side,
                patch_size=8,
                num_layers=4,
                num_heads=4,
                hidden_dim=64,
                mlp_dim=128,
                num_classes=IMAGE_CLASSES,
            )
        ),
        "swin_t": image(lambda: tvm.swin_t(num_classes=IMAGE_CLASSES)),
        "demo_transformer": demo,
        "tabular_mlp": tabular,
        "char_transformer": names,
    }


def _module(net: nn.Module, dm: TensorSplits) -> ImageClassifier:
    return ImageClassifier(net, num_classes=dm.num_classes, lr=1e-3)


def _trainer(callbacks: list, steps: int, root: str) -> pl.Trainer:
    return quiet_trainer(1, callbacks, max_steps=steps, deterministic=False, default_root_dir=root)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(module: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return now.keys() == saved.keys() and all(
        now[k].shape == v.shape and torch.equal(now[k], v) for k, v in saved.items()
    )


def _run_self_compression(make, steps: int, root: str, guard: bool, gamma: float = 1.0) -> dict[str, Any]:
    net, dm = make()
    module = _module(net, dm)
    fresh_net, _ = make()  # same seed: the same architecture, for the reload
    export = Path(root) / "model.safetensors"
    sc = SelfCompression(
        gamma=gamma,
        init_bits=3.0,
        freeze_bits_after=1.0,
        remove_every_n_steps=max(2, steps // 3),
        log_every_n_steps=0,
        export_path=str(export),
    )
    callbacks: list = [sc]
    if guard:
        gd = PreservationGuard(fraction=0.05, check_every_n_steps=max(2, steps // 4), batch_size=16)
        callbacks.append(gd)
    x = dm.dataset("test").tensors[0][:8]
    params_before, macs_before = _cost(fresh_net, x)
    _trainer(callbacks, steps, root).fit(module, datamodule=dm)
    reloaded = load_compressed(export, fresh_net)
    params_after, macs_after = _cost(reloaded, x)
    with torch.no_grad():
        module.eval()
        reloaded.eval()
        a, b = module(x), reloaded(x)
    exact = bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4))
    out: dict[str, Any] = {"reload_exact": exact}
    out.update(sc_summary(sc))
    out.update(params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after)
    if guard:
        out["guard_checks"] = len(getattr(gd, "history", []))
        out["restorations"] = getattr(gd, "restorations", None)
    if not exact:
        raise AssertionError(f"export does not reload exactly (max diff {float((a - b).abs().max()):.3g})")
    return out


def _cost(net: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(parameters, multiply-accumulates of one sample's forward) of a plain model."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net.eval()(x[:1])
    return sum(p.numel() for p in net.parameters()), int(counter.get_total_flops() // 2)


def sc_summary(sc: SelfCompression) -> dict[str, Any]:
    """Removal statistics of a finished SelfCompression run."""
    stats = sc.removal_stats()
    mlp = [n for n in stats["remaining"] if n.endswith(MLP_FIRST)]
    stats["mlp_units_dead_left"] = sum(stats["remaining"][n]["dead"] for n in mlp)
    stats["mlp_units_removed"] = sum(v for n, v in stats.pop("removed_per_layer").items() if n.endswith(MLP_FIRST))
    stats["remaining"] = {n: r for n, r in list(stats["remaining"].items())[:6]}  # a sample of the reasons
    return stats


def _run_fit_end(make, callback, steps: int, root: str, key: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    net, dm = make()
    module = _module(net, dm)
    trainer = _trainer([callback], steps, root)
    saved: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):  # the model as the fit-end callback receives it
        def on_fit_end(self, trainer, pl_module):
            saved.update(_state(pl_module))

    trainer.callbacks.insert(0, Snapshot())
    try:
        trainer.fit(module, datamodule=dm)
    except ValueError:
        if saved and not _unchanged(module, saved):
            raise AssertionError("a refusal changed the model") from None
        raise
    return key(callback)


def cell(model: str, make, column: str, quick: bool, root: str) -> dict[str, Any]:
    steps = 12 if quick else 30
    if column == "self_compression":
        return _run_self_compression(make, steps, root, guard=False)
    if column == "guard":
        return _run_self_compression(make, steps, root, guard=True)
    if column == "cswap":
        cb = CSWAPPruning(target_ratio=0.3, samples_per_class=2, curves=(), batch_size=64)
        return _run_fit_end(make, cb, steps, root, lambda c: {
            "params_ratio": c.result.get("params_ratio"), "neurons_removed": c.result.get("neurons_removed"),
            "neurons_total": c.result.get("neurons_total"),
        })  # fmt: skip
    if column in ("attr_zero", "attr_bypass"):
        cb = AttributionPruning(mode=column.split("_")[1], num_batches=2, batch_size=32)
        return _run_fit_end(make, cb, steps, root, lambda c: {
            "pruned": (c.result.get("pruned") or {}).get(c.scorer_name),
            "candidates": len(c.result.get("candidates", [])),
        })  # fmt: skip
    if column == "lrp":
        cb = LRPCompression(samples_per_class=2 if quick else 4, batch_size=32)
        return _run_fit_end(make, cb, steps, root, lambda c: {
            "pruned_fraction": c.result.get("pruned_fraction"), "size_ratio": c.result.get("size_ratio"),
        })  # fmt: skip
    raise ValueError(column)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    parser.add_argument("--models", default=None, help="comma-separated subset of the rows")
    parser.add_argument("--columns", default=None, help="comma-separated subset of " + ",".join(CALLBACKS))
    parser.add_argument(
        "--docs", action="store_true", help="only rewrite BENCHMARKS.md and the README table from the cached cells"
    )
    args = parser.parse_args(argv)
    for logger in ("lightning.pytorch", "lightning.fabric", "lightning_xai"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    table = models(args.quick)
    rows = args.models.split(",") if args.models else list(table)
    cols = args.columns.split(",") if args.columns else CALLBACKS
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    start = time.time()
    for name in [] if args.docs else rows:
        cells[name] = {}
        for column in cols:
            t0 = time.time()
            with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    info = cell(name, table[name], column, args.quick, root)
                    status = "ran"
                except ValueError as err:
                    status, info = "refused", {"reason": str(err).splitlines()[0][:300]}
                except Exception as err:  # noqa: BLE001 - the matrix records every failure
                    status = "failed"
                    info = {"error": f"{type(err).__name__}: {err}"[:300], "where": traceback.format_exc()[-600:]}
            info["status"], info["seconds"] = status, round(time.time() - t0, 1)
            info["device"] = "cuda" if torch.cuda.is_available() else "cpu"  # the Trainer picks the GPU
            cells[name][column] = info
            if not args.quick:
                _remember(name, column, info)
            print(json.dumps({"model": name, "callback": column, **{k: v for k, v in info.items() if k != "where"}}))
            sys.stdout.flush()
    if not args.quick:  # the matrix of record: every cell's last full-mode run (runs of a subset update it)
        cells = _recall(table, cols=CALLBACKS)
    flat = [c for row in cells.values() for c in row.values()]
    removed_of_dead = {
        name: round(
            (row["self_compression"]["removed_channels"] - row["self_compression"].get("idle_removed", 0))
            / row["self_compression"]["dead_channels"],
            3,
        )
        for name, row in cells.items()
        if row.get("self_compression", {}).get("status") == "ran" and row["self_compression"].get("dead_channels")
    }
    summary = {
        "cells": len(flat),
        "ran": sum(c["status"] == "ran" for c in flat),
        "refused": sum(c["status"] == "refused" for c in flat),
        "failed": sum(c["status"] == "failed" for c in flat),
        "removed_fraction_of_dead": removed_of_dead,
        "quick": args.quick,
        "seconds": round(time.time() - start, 1),
    }
    summary["not_run"] = len(table) * len(CALLBACKS) - len(flat) if not args.quick else 0
    if not args.quick and (args.docs or not summary["not_run"]):
        _write_docs(table, cells, summary)
    print(json.dumps(summary))
    return summary


def _remember(model: str, column: str, info: dict[str, Any]) -> None:
    """Append the cell's result (the last line of a cell wins; appends keep parallel runs of other rows safe)."""
    entry = {"model": model, "callback": column, **{k: v for k, v in info.items() if k != "where"}}
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with CACHE.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _recall(table: dict[str, Any], cols: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for line in CACHE.read_text().splitlines() if CACHE.exists() else []:
        entry = json.loads(line)
        if entry["model"] in table and entry["callback"] in cols:
            found.setdefault(entry["model"], {})[entry["callback"]] = entry
    return {m: {c: found[m][c] for c in cols if c in found.get(m, {})} for m in table if m in found}


def table_rows(cells: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Rows whose SelfCompression cell ran (for the detail table)."""
    return [n for n, row in cells.items() if row.get("self_compression", {}).get("status") == "ran"]


def _short(column: str, info: dict[str, Any]) -> str:
    if info["status"] == "refused":
        return "refused: " + info["reason"][:90].replace("|", "/")
    if info["status"] == "failed":
        return "**failed**: " + info["error"][:90].replace("|", "/")
    if column in ("self_compression", "guard"):
        idle = info.get("idle_removed", 0)
        text = f"{info['removed_channels'] - idle}/{info['dead_channels']} 0-bit channels removed"
        if idle:
            text += f", {idle} idle"
        if info.get("heads_removed"):
            text += f", {info['heads_removed']} heads"
        return text + ", reload exact"
    if column == "cswap":
        return f"params ×{info['params_ratio']:.2f}" if info.get("params_ratio") is not None else "ran"
    if column.startswith("attr"):
        return f"{len(info.get('pruned') or [])}/{info.get('candidates')} layers"
    if column == "lrp":
        return f"pruned {info['pruned_fraction']:.2f}, size ×{info['size_ratio']:.2f}"
    return "ran"


def _write_docs(table: dict[str, Any], cells: dict[str, dict[str, dict[str, Any]]], summary: dict[str, Any]) -> None:
    head = "| model | " + " | ".join(CALLBACKS) + " |\n|---|" + "---|" * len(CALLBACKS) + "\n"
    lines = [
        f"| {name} | "
        + " | ".join(_short(c, cells[name][c]) if c in cells.get(name, {}) else "*not run*" for c in CALLBACKS)
        + " |"
        for name in table
    ]
    table = head + "\n".join(lines) + "\n"
    detail = [
        "| model | 0-bit channels removed | idle removed | heads removed / dead | MLP hidden units removed (0-bit ones "
        "left) | parameters | MACs per sample | reload |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in table_rows(cells):
        c = cells[name]["self_compression"]
        detail.append(
            f"| {name} | {c['removed_channels'] - c.get('idle_removed', 0)}/{c['dead_channels']} | "
            f"{c.get('idle_removed', 0)} | {c['heads_removed']}/{c['dead_heads']} | "
            f"{c.get('mlp_units_removed', 0)} ({c.get('mlp_units_dead_left', 0)}) | "
            f"{c['params_before']:,} → {c['params_after']:,} | {c['macs_before']:,} → {c['macs_after']:,} | "
            f"{'exact' if c['reload_exact'] else 'DIFFERS'} |"
        )
    body = (
        "Every callback on models nobody here wrote (untrained torchvision models at 32×32, a small ViT, swin_t, "
        "Lightning's demo Transformer as a next-token classifier, a tabular MLP, the names CharTransformer); "
        "SelfCompression at γ=1. A cell is *ran*, *refused* (a clear error before the model changed) or *failed*; "
        "*not run* means no run of the cell is on record. Each cell is its last full-mode run, with its wall time "
        "and device, in `benchmarks/results/coverage.jsonl`.\n\n"
        + table
        + "\nSelfCompression (γ = 1, 30 steps) in detail: 0-bit channels removed of all 0-bit channels (the rest sit "
        "in residual streams normalised by LayerNorm, in model outputs, or are the one channel a layer keeps), idle "
        "channels removed (not at 0 bits, but every consumer silent), whole attention heads, MLP hidden units, the "
        "plain model's parameters and multiply-accumulates before and after (reloaded from the packed file):\n\n"
        + "\n".join(detail)
        + "\n\n"
        + f"`{json.dumps({k: v for k, v in summary.items() if k != 'seconds'})}`\n"
    )
    replace_section("coverage", body, "python benchmarks/coverage.py")
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- coverage:start -->", "<!-- coverage:end -->"
    if start in text and end in text:
        text = text[: text.index(start) + len(start)] + "\n" + table + text[text.index(end) :]
        readme.write_text(text)


if __name__ == "__main__":
    main()
