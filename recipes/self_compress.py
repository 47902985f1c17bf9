"""Self-compression recipe: train a reference model with learnable bit depths and export the packed model.

    python recipes/self_compress.py                      # LeNet on scikit-learn digits (offline), TensorBoard on
    python recipes/self_compress.py --quick              # a smoke run in well under a minute
    python recipes/self_compress.py --dataset mnist --data-dir DIR --model resnet

Prints where the TensorBoard logs and the exported model went, and a JSON summary on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xai import SelfCompression
from lightning_xai._validation import require_training
from lightning_xai.data import make_datamodule
from lightning_xai.data.vision import DATASETS
from lightning_xai.models import ImageClassifier
from lightning_xai.models.nets import MODELS
from lightning_xai.quantization.export import load_compressed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", default=None, help="folder with torchvision files (not needed for digits)")
    p.add_argument("--model", choices=MODELS, default="lenet")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=0.05, help="weight of the size penalty Q (bits per weight)")
    p.add_argument(
        "--freeze-bits-after", type=float, default=0.8, help="fraction of training after which bits stop changing"
    )
    p.add_argument("--alpha", type=float, default=0.0, help="weight of the L1 penalty")
    p.add_argument("--exclude", default=None, help="regex of layer names to keep in float")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs", help="folder for TensorBoard logs and the exported model")
    p.add_argument("--quick", action="store_true", help="3 epochs, for CI smoke runs")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    pl.seed_everything(args.seed, verbose=False)
    dm = make_datamodule(args.dataset, args.data_dir, args.batch_size, args.seed, flatten=args.model == "mlp")
    input_shape = tuple(dm.input_shape)  # type: ignore[attr-defined]
    model = ImageClassifier(args.model, input_shape=input_shape, num_classes=dm.num_classes, lr=args.lr)  # type: ignore[attr-defined]
    logger = TensorBoardLogger(args.out, name="self_compress")
    export_path = Path(logger.log_dir) / "model.safetensors"
    callback = SelfCompression(
        gamma=args.gamma,
        alpha=args.alpha,
        exclude=args.exclude,
        log_every_n_steps=10,
        remove_every_n_steps=50,
        freeze_bits_after=args.freeze_bits_after,
        export_path=str(export_path),
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
    require_training(trainer, "recipes/self_compress.py")
    test_acc = float(trainer.test(model, dm, verbose=False)[0]["test/acc"])
    size = callback.compressor.size()
    fresh = ImageClassifier(args.model, input_shape=input_shape, num_classes=dm.num_classes)  # type: ignore[attr-defined]
    load_compressed(export_path, fresh)
    summary = {
        "test_acc": round(test_acc, 4),
        "bits_ratio": round(size.bits_ratio, 4),
        "size_ratio": round(size.size_ratio, 4),
        "packed_bytes": os.path.getsize(export_path),
        "channels_removed": callback.channels_removed,
        "params_after": sum(p.numel() for p in fresh.parameters()),
        "tensorboard": logger.log_dir,
        "export": str(export_path),
    }
    print(f"TensorBoard logs: {logger.log_dir}   (view: tensorboard --logdir {args.out})")
    print(f"Packed model:     {export_path} ({summary['packed_bytes']} bytes; load with lightning_xai.load_compressed)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    main()
