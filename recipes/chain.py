"""The whole pipeline in one Trainer run: safety-guided self-compression during training (SelfCompression +
PreservationGuard), C-SWAP structured pruning at fit end, then one packed export that reloads without pickle.

    python recipes/chain.py                # SmallResNet on digits: float warm-up, then compression and pruning
    python recipes/chain.py --quick        # a smoke run

Prints where the TensorBoard logs (bits, preservation, Grad-CAM, pruning curves) and the packed model went, and a JSON
summary on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xai import CSWAPPruning, PreservationGuard, SelfCompression
from lightning_xai._validation import require_training
from lightning_xai.data import DigitsDataModule
from lightning_xai.evaluation import accuracy
from lightning_xai.models import ImageClassifier
from lightning_xai.quantization.export import load_compressed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float-epochs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=20, help="compression epochs")
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument(
        "--target-ratio", type=float, default=0.3, help="C-SWAP: fraction of the parameters to remove at fit end"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs")
    p.add_argument("--quick", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=args.seed)
    width = 4 if args.quick else 16

    def fresh() -> ImageClassifier:
        return ImageClassifier("resnet", width=width)

    model = fresh()
    quiet = {"enable_progress_bar": not args.quick, "enable_model_summary": False, "enable_checkpointing": False}
    pl.Trainer(max_epochs=2 if args.quick else args.float_epochs, logger=False, **quiet).fit(model, dm)
    logger = TensorBoardLogger(args.out, name="chain")
    export_path = Path(logger.log_dir) / "model.safetensors"
    sc = SelfCompression(gamma=args.gamma, log_every_n_steps=5, remove_every_n_steps=20)
    guard = PreservationGuard(fraction=0.1, lam=0.5, max_drop=0.02, cooldown_steps=10, seed=args.seed)
    cswap = CSWAPPruning(
        target_ratio=args.target_ratio,
        samples_per_class=4 if args.quick else 64,
        curves=("cswap", "omp"),
        curve_points=6 if args.quick else 21,
        seed=args.seed,
    )
    trainer = pl.Trainer(
        max_epochs=2 if args.quick else args.epochs,
        callbacks=[sc, guard, cswap],
        logger=logger,
        log_every_n_steps=5,
        **quiet,
    )
    trainer.fit(model, dm)
    require_training(trainer, "recipes/chain.py")
    size = sc.compressor.size()
    written = None
    if trainer.is_global_zero:
        from lightning_xai.quantization.export import export_compressed

        written = export_compressed(model, export_path)
    reloaded = load_compressed(export_path, fresh()).eval()
    tx, ty = dm.dataset("test").tensors
    model.eval()
    with torch.no_grad():
        same = bool(torch.allclose(reloaded(tx[:64]), model(tx[:64]), atol=1e-5, rtol=1e-4))
    summary = {
        "test_acc": round(accuracy(model, tx, ty), 4),
        "test_acc_reloaded": round(accuracy(reloaded, tx, ty), 4),
        "reload_matches": same,
        "bits_ratio": round(size.bits_ratio, 4),
        "cswap_params_ratio": round(cswap.result["params_ratio"], 4),
        "params_after": sum(p.numel() for p in reloaded.parameters()),
        "file_bytes": written if written is not None else os.path.getsize(export_path),
        "restorations": len(guard.restorations),
        "tensorboard": logger.log_dir,
        "export": str(export_path),
    }
    print(f"TensorBoard logs: {logger.log_dir}   (view: tensorboard --logdir {args.out})")
    print(f"Packed model: {export_path}   (load: load_compressed(path, fresh_model))")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
