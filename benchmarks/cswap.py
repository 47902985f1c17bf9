"""C-SWAP benchmark: pruning curves and SAUCE (C-SWAP, C-BP, OMP, random), neuron categories, fast vs reference
engine (speed and identical decisions), and the 50%-parameter model's size and CPU latency.

A small residual CNN is trained on digits (or CIFAR-10 with ``--data-dir``), then analysed with ``M`` samples per
class from the training split; curves are accuracy on the held-out test split vs % of all parameters removed, without
fine-tuning. Prints one JSON line; the full run rewrites the ``cswap`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import quiet_trainer, update_benchmarks_md  # noqa: E402

from lightning_xai.data import DigitsDataModule, make_datamodule  # noqa: E402
from lightning_xai.evaluation import count_macs, latency_ratio  # noqa: E402
from lightning_xai.models import ImageClassifier  # noqa: E402
from lightning_xai.pruning.cswap import (  # noqa: E402
    PruningOrder,
    cbp_order,
    class_balanced_samples,
    cswap_order,
    magnitude_order,
    plan_from_order,
    prefix_for_ratio,
    pruning_curve,
    random_order,
)
from lightning_xai.pruning.units import apply_plan, find_units  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small budget for CI")
    parser.add_argument("--data-dir", default=None, help="use CIFAR-10 from this folder (downloads need a network)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=None, help="analysis samples per class (default 64)")
    parser.add_argument(
        "--analysis-split",
        choices=("train", "val"),
        default="train",
        help="where the analysis samples come from (default train; 'val' has only ~26 digits per class)",
    )
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 30)
    per_class = args.per_class or (8 if args.quick else 64)
    torch.set_num_threads(2)
    pl.seed_everything(args.seed, workers=True)

    if args.data_dir:
        dm = make_datamodule("cifar10", data_dir=args.data_dir, batch_size=128, seed=args.seed)
        dataset_name = "cifar10"
    else:
        dm = DigitsDataModule(batch_size=64, seed=args.seed)
        dataset_name = "digits"
    dm.prepare_data()
    dm.setup("fit")
    model = ImageClassifier("resnet", input_shape=dm.input_shape, width=args.width, blocks=args.blocks)
    quiet_trainer(epochs, []).fit(model, dm)
    net = model.net.eval()
    x, y = class_balanced_samples(dm.dataset(args.analysis_split), per_class, args.seed)
    tx, ty = dm.dataset("test").tensors
    units, refused = find_units(net, x[:4])

    fast = cswap_order(net, units, x, y, alpha=args.alpha, mode="fast")
    ref = cswap_order(net, units, x, y, alpha=args.alpha, mode="reference")
    same = fast.order == ref.order and all(torch.equal(fast.category[u], ref.category[u]) for u in ref.category)
    orders: dict[str, PruningOrder] = {
        "cswap": fast,
        "cbp": cbp_order(net, units, x, y, alpha=args.alpha),
        "omp": magnitude_order(units),
        "omp_mean_abs": magnitude_order(units, "mean_abs"),
        "random": random_order(units, args.seed),
    }
    points = 11 if args.quick else 21
    curves = {m: pruning_curve(net, units, o, tx, ty, points=points) for m, o in orders.items()}
    base_acc = curves["cswap"].accuracy[0]

    total = sum(p.numel() for p in net.parameters())
    k50 = prefix_for_ratio(net, units, fast.order, 0.5)
    pruned = copy.deepcopy(net)
    apply_plan(pruned, units, plan_from_order(units, fast.order, k50), x[:8])
    bench_x = tx[:256]
    latency = latency_ratio(net, pruned, bench_x, rounds=3 if args.quick else 7)
    with torch.no_grad():
        acc50 = float((pruned(tx).argmax(1) == ty).double().mean())
    flops0, _ = count_macs(net, x[:1])
    flops50, _ = count_macs(pruned, x[:1])

    result = {
        "dataset": dataset_name,
        "model": f"SmallResNet(width={args.width}, blocks={args.blocks})",
        "epochs": epochs,
        "analysis_split": args.analysis_split,
        "samples_per_class": int(torch.bincount(y).min()),
        "neurons": len(fast.order),
        "params": total,
        "float_acc": base_acc,
        "sauce": {m: round(c.sauce, 2) for m, c in curves.items()},
        "sauce_ratio_cswap_over_omp": curves["cswap"].sauce / curves["omp"].sauce,
        "categories": fast.category_fractions(),
        "non_critical_removed": fast.non_critical,
        "speedup_vs_naive": ref.seconds / fast.seconds,
        "same_decisions_as_naive": same,
        "neurons_per_s": fast.neurons_per_s,
        "naive_neurons_per_s": ref.neurons_per_s,
        "forwards_fast": fast.forwards,
        "forwards_naive": ref.forwards,
        "params_ratio_at_50": sum(p.numel() for p in pruned.parameters()) / total,
        "flops_ratio_at_50": flops50 / flops0,
        "latency_ratio_at_50": latency,
        "cswap_acc_at_50": acc50,
        "acc_at_50": {m: _acc_at(c, 0.5) for m, c in curves.items()},
        "refused": sorted(refused),
    }
    if not args.quick:
        update_benchmarks_md("cswap", result, "python benchmarks/cswap.py " + " ".join(argv or sys.argv[1:]))
    print(json.dumps(result))
    return result


def _acc_at(curve, ratio: float) -> float:
    """Accuracy at the first curve point removing at least ``ratio`` of the parameters."""
    for removed, acc in zip(curve.removed, curve.accuracy):
        if removed >= ratio - 1e-9:
            return acc
    return curve.accuracy[-1]


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"# {time.perf_counter() - t0:.0f} s", file=sys.stderr)
