"""C-SWAP recipe: train a residual CNN, then prune it at fit end with causal structured pruning (no fine-tuning).

    python recipes/cswap_prune.py                          # SmallResNet on scikit-learn digits (offline)
    python recipes/cswap_prune.py --target-ratio none      # remove exactly the non-critical neurons
    python recipes/cswap_prune.py --quick                  # a smoke run in seconds
    python recipes/cswap_prune.py --dataset cifar10 --data-dir DIR

Prints where the TensorBoard logs (curves, categories, SAUCE) and the pruned model went, and a JSON summary on its
last line. The pruned model loads into a fresh model instance with ``load_pruned`` (no pickle).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xai import CSWAPPruning
from lightning_xai._validation import require_training
from lightning_xai.data import make_datamodule
from lightning_xai.data.vision import DATASETS
from lightning_xai.models import ImageClassifier
from lightning_xai.pruning.units import load_pruned


def _ratio(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", default=None, help="folder with torchvision files (not needed for digits)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--target-ratio", type=_ratio, default=0.5, help="fraction of parameters to remove, or 'none'")
    p.add_argument("--samples-per-class", type=int, default=64)
    p.add_argument("--mode", choices=("fast", "reference"), default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs", help="folder for TensorBoard logs and the pruned model")
    p.add_argument("--quick", action="store_true", help="2 epochs, few samples, for CI smoke runs")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    per_class = 4 if args.quick else args.samples_per_class
    pl.seed_everything(args.seed, verbose=False)
    dm = make_datamodule(args.dataset, args.data_dir, 64, args.seed)
    input_shape = tuple(dm.input_shape)  # type: ignore[attr-defined]
    width = 4 if args.quick else args.width

    def fresh() -> ImageClassifier:
        return ImageClassifier("resnet", input_shape=input_shape, num_classes=dm.num_classes, width=width)  # type: ignore[attr-defined]

    model = fresh()
    logger = TensorBoardLogger(args.out, name="cswap")
    export_path = Path(logger.log_dir) / "pruned.safetensors"
    callback = CSWAPPruning(
        target_ratio=args.target_ratio,
        samples_per_class=per_class,
        mode=args.mode,
        curves=("cswap", "omp", "random"),
        curve_points=6 if args.quick else 21,
        export_path=export_path,
        seed=args.seed,
        progress=not args.quick,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=logger,
        log_every_n_steps=10,
        enable_progress_bar=not args.quick,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    require_training(trainer, "recipes/cswap_prune.py")
    reloaded, _ = load_pruned(export_path, fresh())
    test_acc = float(trainer.test(reloaded, dm, verbose=False)[0]["test/acc"])
    r = callback.result
    summary = {
        "val_acc_before": round(r["accuracy_before"], 4),
        "val_acc_after": round(r["accuracy_after"], 4),
        "test_acc_pruned_reloaded": round(test_acc, 4),
        "params_before": r["params_before"],
        "params_after": r["params_after"],
        "flops_ratio": round(r["flops_after"] / r["flops_before"], 4),
        "latency_ratio": round(r["latency_ratio"], 4),
        "sauce": {k: round(v, 2) for k, v in r["sauce"].items()},
        "categories": {k: round(v, 4) for k, v in r["categories"].items()},
        "tensorboard": logger.log_dir,
        "export": str(export_path),
    }
    print(f"TensorBoard logs: {logger.log_dir}   (view: tensorboard --logdir {args.out})")
    print(f"Pruned model: {export_path}   (load: load_pruned(path, fresh_model))")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
