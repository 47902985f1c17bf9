"""Layer attribution benchmark: gradient × activation vs L1 layer pruning (bottom 5 % of layers, no fine-tuning).

1. A small residual CNN trained on digits: both rankings, their Spearman/Kendall correlation, the pruned layers,
   test accuracy and CPU latency after pruning, in ``zero`` mode (the paper) and ``bypass`` mode.
2. Graph coverage on untrained torchvision models (no weights download): ResNet-18 (classification loss on random
   data) and SSDlite-MobileNetV3 (the detector's own loss dict on random boxes): scores, rankings, bypass keeps the
   output shapes, latency ratios.

Prints one JSON line; the full run rewrites the ``layer_attribution`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from _common import quiet_trainer, update_benchmarks_md  # noqa: E402

from lightning_xai.attribution.layers import GradientActivationScorer, L1Scorer, detection_loss  # noqa: E402
from lightning_xai.callbacks.attribution_pruning import compare_rankings  # noqa: E402
from lightning_xai.data import DigitsDataModule  # noqa: E402
from lightning_xai.evaluation import accuracy, latency_ratio  # noqa: E402
from lightning_xai.models import ImageClassifier  # noqa: E402
from lightning_xai.pruning.layer_pruning import (  # noqa: E402
    bypassable_layers,
    default_candidates,
    prune_layers,
    select_bottom,
)


def _digits(args) -> dict:
    pl.seed_everything(args.seed, workers=True)
    dm = DigitsDataModule(batch_size=64, seed=args.seed)
    model = ImageClassifier("resnet", blocks=args.blocks)
    quiet_trainer(args.epochs, []).fit(model, dm)
    net = model.net.eval()
    vx, vy = dm.dataset("val").tensors
    tx, ty = dm.dataset("test").tensors
    example = vx[:8]
    batches = [(vx[i : i + 256], vy[i : i + 256]) for i in range(0, len(vx), 256)]
    out: dict = {"baseline_acc": accuracy(net, tx, ty)}
    for mode in ("zero", "bypass"):
        candidates = default_candidates(net, example)
        if mode == "bypass":
            able = bypassable_layers(net, example, candidates)
            candidates = [c for c in candidates if c in able]
        attr = GradientActivationScorer(num_batches=4, layers=candidates).score(net, batches)
        l1 = L1Scorer(layers=candidates).score(net)
        res = {"candidates": len(candidates), **compare_rankings(attr, l1, candidates)}
        for name, scores in (("attr", attr), ("l1", l1)):
            pruned = select_bottom(scores, args.fraction, candidates)
            m = copy.deepcopy(net)
            prune_layers(m, pruned, mode, example)
            res[f"{name}_pruned"] = pruned
            res[f"{name}_acc"] = accuracy(m, tx, ty)
            res[f"{name}_latency_ratio"] = latency_ratio(net, m, tx[:256], rounds=args.rounds)
        res["attr_ranking"] = sorted(candidates, key=attr.get)
        res["l1_ranking"] = sorted(candidates, key=l1.get)
        out[mode] = res
    return out


def _coverage(args) -> dict:
    torch.manual_seed(args.seed)
    out: dict = {}
    r18 = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(8, 3, 64, 64)
    y = torch.randint(0, 10, (8,))
    out["resnet18"] = _graph(r18, [(x, y)], GradientActivationScorer(num_batches=1), args, (x,))
    ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    ).eval()
    images = [torch.rand(3, 320, 320) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 120.0, 150.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[50.0, 40.0, 200.0, 260.0]]), "labels": torch.tensor([2])},
    ]
    scorer = GradientActivationScorer(detection_loss, num_batches=1)
    out["ssdlite"] = _graph(ssd, [(images, targets)], scorer, args, (images,))
    return out


def _graph(model, batches, scorer, args, example) -> dict:
    candidates = default_candidates(model, example)
    able = bypassable_layers(model, example, candidates)
    attr = scorer.score(model, batches)
    l1 = L1Scorer(layers=candidates).score(model)
    corr = compare_rankings(attr, l1, candidates)
    pruned = select_bottom(attr, args.fraction, [c for c in candidates if c in able])
    m = copy.deepcopy(model)
    with torch.no_grad():
        before = model(*example)
    prune_layers(m, pruned, "bypass", example)
    with torch.no_grad():
        after = m(*example)
    same = (
        before.shape == after.shape
        if isinstance(before, torch.Tensor)
        else [len(d["boxes"].shape) for d in before] == [len(d["boxes"].shape) for d in after]
    )
    ratio = latency_ratio(model, m, example[0], rounds=3, repeats=3)  # a tensor, or a detector's list of images
    return {
        "layers": len(candidates),
        "bypassable": len(able),
        "spearman": corr["spearman"],
        "bypassed": pruned,
        "outputs_kept": bool(same),
        "bypass_latency_ratio": ratio,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (3 if args.quick else 30)
    args.rounds = 3 if args.quick else 9
    torch.set_num_threads(2)
    digits = _digits(args)
    result = {
        "baseline_acc": digits["baseline_acc"],
        "attr_acc": digits["zero"]["attr_acc"],
        "l1_acc": digits["zero"]["l1_acc"],
        "rank_spearman": digits["zero"]["spearman"],
        "rank_kendall": digits["zero"]["kendall"],
        "attr_latency_ratio": digits["zero"]["attr_latency_ratio"],
        "l1_latency_ratio": digits["zero"]["l1_latency_ratio"],
        "bypass_attr_acc": digits["bypass"]["attr_acc"],
        "bypass_l1_acc": digits["bypass"]["l1_acc"],
        "bypass_attr_latency_ratio": digits["bypass"]["attr_latency_ratio"],
        "bypass_l1_latency_ratio": digits["bypass"]["l1_latency_ratio"],
        "digits": digits,
        "coverage": _coverage(args) if not args.quick else {},
    }
    if not args.quick:
        update_benchmarks_md(
            "layer_attribution", result, "python benchmarks/layer_attribution.py " + " ".join(argv or sys.argv[1:])
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
