"""Self-compression on digits: float baseline vs the self-compressed model, same seed and budget.

    python benchmarks/self_compression.py [--quick]

Prints one JSON object on its last line; the full mode rewrites its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import StepTimer, quiet_trainer, update_benchmarks_md  # noqa: E402

from lightning_xai.callbacks import SelfCompression  # noqa: E402
from lightning_xai.data import DigitsDataModule  # noqa: E402
from lightning_xai.models import ImageClassifier  # noqa: E402
from lightning_xai.quantization.export import load_compressed  # noqa: E402


def _train(
    epochs: int, seed: int, callbacks: list, model_kwargs: dict
) -> tuple[ImageClassifier, DigitsDataModule, float]:
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=seed)
    model = ImageClassifier("lenet", **model_kwargs)
    trainer = quiet_trainer(epochs, callbacks)
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    return model, dm, float(acc)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run for CI")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--freeze-bits-after", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = args.epochs or (8 if args.quick else 60)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    float_timer = StepTimer()
    float_model, dm, float_acc = _train(epochs, args.seed, [float_timer], {})
    tmp = Path(tempfile.mkdtemp())
    float_file = tmp / "float.pt"
    torch.save(float_model.net.state_dict(), float_file)

    timer = StepTimer()
    packed = tmp / "model.safetensors"
    cb = SelfCompression(
        gamma=args.gamma,
        remove_every_n_steps=50,
        log_every_n_steps=0,
        freeze_bits_after=args.freeze_bits_after,
        export_path=str(packed),
    )
    model, dm, compressed_acc = _train(epochs, args.seed, [cb, timer], {})
    size = cb.compressor.size()
    steps_per_epoch = len(timer.times) // epochs

    # reload the packed file into a fresh plain model and check it reproduces the quantized model exactly
    fresh = ImageClassifier("lenet")
    load_compressed(packed, fresh)
    x = torch.stack([dm.dataset("test")[i][0] for i in range(len(dm.dataset("test")))])
    model.eval()
    fresh.eval()
    with torch.no_grad():
        reload_exact = bool(torch.equal(model(x), fresh(x)))

    result = {
        "benchmark": "self_compression",
        "mode": "quick" if args.quick else "full",
        "epochs": epochs,
        "gamma": args.gamma,
        "freeze_bits_after": args.freeze_bits_after,
        "float_acc": round(float_acc, 4),
        "compressed_acc": round(compressed_acc, 4),
        "bits_ratio": round(size.bits_ratio, 4),
        "size_ratio": round(size.size_ratio, 4),
        "file_bytes_ratio": round(packed.stat().st_size / float_file.stat().st_size, 4),
        "packed_bytes": packed.stat().st_size,
        "float_file_bytes": float_file.stat().st_size,
        "step_time_ratio": round(timer.median / float_timer.median, 3),
        # the same ratio over the first epoch only: pure quantizer overhead, before any channel was removed
        "step_time_ratio_first_epoch": round(
            statistics.median(timer.times[:steps_per_epoch]) / statistics.median(float_timer.times[:steps_per_epoch]), 3
        ),
        "float_step_ms": round(1000 * float_timer.median, 3),
        "compressed_step_ms": round(1000 * timer.median, 3),
        "channels_removed": cb.channels_removed,
        "params_float": sum(p.numel() for p in float_model.net.parameters()),
        "params_after": sum(p.numel() for p in fresh.net.parameters()),
        "reload_exact": reload_exact,
    }
    if not args.quick:
        cmd = "python benchmarks/self_compression.py" + " ".join(argv or sys.argv[1:]).join([" ", ""]).rstrip()
        update_benchmarks_md("self_compression", result, cmd)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
