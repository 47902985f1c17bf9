"""Layer-pruning recipe: train a residual CNN, then prune the least important 5 % of its layers at fit end, ranked by
gradient × activation (the explainability-inspired score) and compared with L1.

    python recipes/layer_prune.py                     # SmallResNet (2 blocks per stage) on digits, zero mode
    python recipes/layer_prune.py --mode bypass       # replace same-shape layers by identities (really faster)
    python recipes/layer_prune.py --quick             # a smoke run in seconds

Prints where the TensorBoard logs (rankings figure, correlations, accuracy, latency) went and a JSON summary.
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xai import AttributionPruning
from lightning_xai._validation import require_training
from lightning_xai.data import make_datamodule
from lightning_xai.data.vision import DATASETS
from lightning_xai.models import ImageClassifier


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--mode", choices=("zero", "bypass"), default="zero")
    p.add_argument("--scorer", choices=("gradxact", "taylor"), default="gradxact")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs")
    p.add_argument("--quick", action="store_true", help="2 epochs, for CI smoke runs")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    dm = make_datamodule(args.dataset, args.data_dir, 64, args.seed)
    model = ImageClassifier(
        "resnet",
        input_shape=tuple(dm.input_shape),  # type: ignore[attr-defined]
        num_classes=dm.num_classes,  # type: ignore[attr-defined]
        width=4 if args.quick else 16,
        blocks=2,
    )
    logger = TensorBoardLogger(args.out, name="layer_prune")
    callback = AttributionPruning(scorer=args.scorer, fraction=args.fraction, mode=args.mode)
    trainer = pl.Trainer(
        max_epochs=2 if args.quick else args.epochs,
        callbacks=[callback],
        logger=logger,
        enable_progress_bar=not args.quick,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, dm)
    require_training(trainer, "recipes/layer_prune.py")
    r = callback.result
    summary = {
        "mode": r["mode"],
        "pruned": r["pruned"],
        "spearman": round(r["spearman"], 4),
        "kendall": round(r["kendall"], 4),
        "val_acc_before": round(r["accuracy_before"], 4),
        "val_acc_attr": round(r["accuracy_attr"], 4),
        "val_acc_l1": round(r["accuracy_l1"], 4),
        "latency_ratio_attr": round(r["latency_ratio_attr"], 4),
        "latency_ratio_l1": round(r["latency_ratio_l1"], 4),
        "tensorboard": logger.log_dir,
    }
    print(f"TensorBoard logs: {logger.log_dir}   (view: tensorboard --logdir {args.out})")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
