"""Safety-guided self-compression: train a float model, then compress it with SelfCompression + PreservationGuard.

    python recipes/safe_compress.py                    # LeNet CNN on scikit-learn digits
    python recipes/safe_compress.py --task names       # character attention model on US census names
    python recipes/safe_compress.py --quick            # smoke run

The names task is a 3-class classifier (female first name / male first name / last name; names found in more than
one census list are dropped, classes balanced). Quantizers sit on the attention input/output projections, the MLP
layers and the head. Prints where the TensorBoard logs and the packed model went, and a JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xai import PreservationGuard, SelfCompression
from lightning_xai._validation import require_training
from lightning_xai.data import DigitsDataModule, NamesDataModule
from lightning_xai.models import ImageClassifier

TASKS = {
    "digits": ("lenet", lambda bs, seed: DigitsDataModule(batch_size=bs, seed=seed), (1, 8, 8)),
    "names": ("char_transformer", lambda bs, seed: NamesDataModule(batch_size=bs, seed=seed), (12,)),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="digits")
    p.add_argument("--float-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=20, help="compression epochs")
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--lam", type=float, default=0.5, help="weight of the preservation loss")
    p.add_argument("--fraction", type=float, default=0.1, help="share of training samples in the preservation set")
    p.add_argument("--max-drop", type=float, default=0.02, help="allowed drop of preservation accuracy")
    p.add_argument("--cooldown", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs")
    p.add_argument("--quick", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    float_epochs, epochs = (2, 2) if args.quick else (args.float_epochs, args.epochs)
    model_name, make_dm, shape = TASKS[args.task]
    pl.seed_everything(args.seed, verbose=False)
    dm = make_dm(64, args.seed)
    model = ImageClassifier(model_name, input_shape=shape, num_classes=dm.num_classes, lr=2e-3)
    quiet = dict(enable_progress_bar=not args.quick, enable_model_summary=False, num_sanity_val_steps=0)
    # float phase: early stopping on validation accuracy (never on test), so the float model does not over-fit and
    # the preservation accuracy measured on training samples stays a meaningful signal
    early = EarlyStopping("val/acc", mode="max", patience=3)
    pl.Trainer(max_epochs=float_epochs, logger=False, enable_checkpointing=False, callbacks=[early], **quiet).fit(
        model, dm
    )
    logger = TensorBoardLogger(args.out, name=f"safe_compress_{args.task}")
    export_path = Path(logger.log_dir) / "model.safetensors"
    sc = SelfCompression(gamma=args.gamma, log_every_n_steps=10, remove_every_n_steps=50, export_path=str(export_path))
    guard = PreservationGuard(
        fraction=args.fraction, lam=args.lam, max_drop=args.max_drop, cooldown_steps=args.cooldown, seed=args.seed
    )
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[sc, guard], logger=logger, log_every_n_steps=10, **quiet)
    trainer.fit(model, dm)
    require_training(trainer, "recipes/safe_compress.py")
    test_acc = float(trainer.test(model, dm, verbose=False)[0]["test/acc"])
    summary = {
        "task": args.task,
        "test_acc": round(test_acc, 4),
        "bits_ratio": round(sc.compressor.size().bits_ratio, 4),
        "preservation_set": len(guard.indices) if guard.indices is not None else 0,
        "preservation_acc": guard.last_accuracy,
        "threshold": guard.threshold,
        "restorations": len(guard.restorations),
        "tensorboard": logger.log_dir,
        "export": str(export_path),
    }
    print(f"TensorBoard logs: {logger.log_dir}   (view: tensorboard --logdir {args.out})")
    print(f"Packed model:     {export_path}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    main()
