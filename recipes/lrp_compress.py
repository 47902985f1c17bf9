"""LRP compression recipe (the paper's setting): a 3-layer ReLU dense network on the synthetic "multi" set (or a
LeNet on digits), then LRP weight relevance → pruning → median-threshold mixed precision at fit end, packed export.

    python recipes/lrp_compress.py                                  # paper's criterion: prune R <= 0, 8/4 bits
    python recipes/lrp_compress.py --relevance absolute --prune 0.3 # the variant that works better here
    python recipes/lrp_compress.py --dataset digits --bits 16 8
    python recipes/lrp_compress.py --quick

Prints where the TensorBoard logs and the packed model went and a JSON summary on its last line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xai import LRPCompression
from lightning_xai._validation import require_training
from lightning_xai.data import DigitsDataModule, SyntheticMultiDataModule
from lightning_xai.evaluation import accuracy
from lightning_xai.models import ImageClassifier
from lightning_xai.quantization.mixed import load_mixed


def _prune(text: str) -> str | float:
    return text if text == "nonpositive" else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("synthetic", "digits"), default="synthetic")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--prune", type=_prune, default="nonpositive", help="'nonpositive' or a quantile in [0, 1)")
    p.add_argument("--bits", type=int, nargs=2, default=(8, 4), metavar=("HIGH", "LOW"))
    p.add_argument("--relevance", choices=("signed", "absolute"), default="signed")
    p.add_argument("--samples-per-class", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs")
    p.add_argument("--quick", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    if args.dataset == "synthetic":
        dm = SyntheticMultiDataModule(seed=args.seed, n_samples=1200 if args.quick else 6000)

        def fresh() -> ImageClassifier:
            return ImageClassifier("mlp", input_shape=(20,), num_classes=6, hidden=64 if args.quick else 256)

    else:
        dm = DigitsDataModule(seed=args.seed)

        def fresh() -> ImageClassifier:
            return ImageClassifier("lenet")

    model = fresh()
    logger = TensorBoardLogger(args.out, name="lrp_compress")
    export_path = Path(logger.log_dir) / "model.safetensors"
    callback = LRPCompression(
        samples_per_class=4 if args.quick else args.samples_per_class,
        prune=args.prune,
        bits=tuple(args.bits),
        relevance=args.relevance,
        export_path=export_path,
        seed=args.seed,
    )
    trainer = pl.Trainer(
        max_epochs=2 if args.quick else args.epochs,
        callbacks=[callback],
        logger=logger,
        enable_progress_bar=not args.quick,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, dm)
    require_training(trainer, "recipes/lrp_compress.py")
    reloaded = load_mixed(export_path, fresh()).eval()
    tx, ty = dm.dataset("test").tensors
    r = callback.result
    summary = {
        "val_acc_before": round(r["accuracy_before"], 4),
        "val_acc_after": round(r["accuracy_after"], 4),
        "test_acc_reloaded": round(accuracy(reloaded, tx, ty), 4),
        "pruned_fraction": round(r["pruned_fraction"], 4),
        "size_ratio": round(r["size_ratio"], 4),
        "file_bytes": r["exported_bytes"],
        "tensorboard": logger.log_dir,
        "export": str(export_path),
    }
    print(f"TensorBoard logs: {logger.log_dir}   (view: tensorboard --logdir {args.out})")
    print(f"Packed model: {export_path}   (load: load_mixed(path, fresh_model))")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
