"""Self-compression on digits: float baseline vs the callback's defaults vs a tuned γ, same seeds and budget.

    python benchmarks/self_compression.py [--quick] [--seeds N] [--gamma G]

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
from _common import StepTimer, quiet_trainer, replace_section  # noqa: E402

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


def _compress(epochs: int, seed: int, callback: SelfCompression, float_timer: StepTimer, tmp: Path) -> dict:
    """Train with ``callback``, reload its packed file into a fresh model, and measure against the float run."""
    timer = StepTimer()
    model, dm, acc = _train(epochs, seed, [callback, timer], {})
    size = callback.compressor.size()
    packed = Path(callback.exported_path)
    fresh = ImageClassifier("lenet")
    load_compressed(packed, fresh)  # the packed file must reproduce the quantized model exactly
    x = torch.stack([dm.dataset("test")[i][0] for i in range(len(dm.dataset("test")))])
    model.eval()
    fresh.eval()
    with torch.no_grad():
        reload_exact = bool(torch.equal(model(x), fresh(x)))
    steps = max(len(timer.times) // epochs, 1)
    return {
        "acc": acc,
        "bits_ratio": size.bits_ratio,
        "size_ratio": size.size_ratio,
        "file_bytes_ratio": packed.stat().st_size / (tmp / "float.pt").stat().st_size,
        "packed_bytes": packed.stat().st_size,
        "step_time_ratio": timer.median / float_timer.median,
        # the same ratio over the first epoch only: the quantizer's overhead before any channel was removed
        "step_time_ratio_first_epoch": statistics.median(timer.times[:steps])
        / statistics.median(float_timer.times[:steps]),
        "channels_removed": callback.channels_removed,
        "params_after": sum(p.numel() for p in fresh.net.parameters()),
        "reload_exact": reload_exact,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run for CI (1 seed, 8 epochs)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--gamma", type=float, default=0.05, help="the tuned γ (the defaults run as well)")
    parser.add_argument("--freeze-bits-after", type=float, default=0.8)
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (3 by default, 1 in quick mode)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (8 if args.quick else 60)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    runs: dict[str, list[dict]] = {"float": [], "defaults": [], "tuned": []}
    for seed in seeds:
        tmp = Path(tempfile.mkdtemp())
        float_timer = StepTimer()
        float_model, _, float_acc = _train(epochs, seed, [float_timer], {})
        torch.save(float_model.net.state_dict(), tmp / "float.pt")
        runs["float"].append({"acc": float_acc, "params": sum(p.numel() for p in float_model.net.parameters())})
        # what a user gets who adds the callback and changes nothing
        defaults = SelfCompression(export_path=str(tmp / "defaults.safetensors"))
        runs["defaults"].append(_compress(epochs, seed, defaults, float_timer, tmp))
        tuned = SelfCompression(
            gamma=args.gamma,
            remove_every_n_steps=50,
            log_every_n_steps=0,
            freeze_bits_after=args.freeze_bits_after,
            export_path=str(tmp / "tuned.safetensors"),
        )
        runs["tuned"].append(_compress(epochs, seed, tuned, float_timer, tmp))

    def agg(name: str, key: str, digits: int = 4) -> list[float]:
        m, s = _mean_std([float(r[key]) for r in runs[name]])
        return [round(m, digits), round(s, digits)]

    result = {
        "benchmark": "self_compression",
        "mode": "quick" if args.quick else "full",
        "epochs": epochs,
        "seeds": len(seeds),
        "gamma": args.gamma,
        "default_gamma": SelfCompression().compressor.gamma,
        "freeze_bits_after": args.freeze_bits_after,
        "float_acc": agg("float", "acc")[0],
        "compressed_acc": agg("tuned", "acc")[0],
        "bits_ratio": agg("tuned", "bits_ratio")[0],
        "step_time_ratio": agg("tuned", "step_time_ratio", 3)[0],
        "float_acc_mean_std": agg("float", "acc"),
        "float_params": runs["float"][0]["params"],
    }
    for name in ("defaults", "tuned"):
        for key in ("acc", "bits_ratio", "size_ratio", "file_bytes_ratio", "step_time_ratio"):
            result[f"{name}_{key}_mean_std"] = agg(name, key, 3 if "time" in key else 4)
        result[f"{name}_step_time_ratio_first_epoch"] = agg(name, "step_time_ratio_first_epoch", 3)[0]
        result[f"{name}_packed_bytes"] = [r["packed_bytes"] for r in runs[name]]
        result[f"{name}_channels_removed"] = [r["channels_removed"] for r in runs[name]]
        result[f"{name}_params_after"] = [r["params_after"] for r in runs[name]]
        result[f"{name}_reload_exact"] = all(r["reload_exact"] for r in runs[name])
    result["per_seed_acc"] = {name: [round(float(r["acc"]), 4) for r in rs] for name, rs in runs.items()}
    if not args.quick:
        cmd = "python benchmarks/self_compression.py" + " ".join(argv or sys.argv[1:]).join([" ", ""]).rstrip()
        replace_section("self_compression", _markdown(result), cmd)
    print(json.dumps(result))
    return result


def _markdown(r: dict) -> str:
    def pm(v: list[float], pct: bool = False) -> str:
        return f"{100 * v[0]:.2f} ± {100 * v[1]:.2f} %" if pct else f"{v[0]:.4g} ± {v[1]:.2g}"

    lines = [
        f"LeNet on digits (360 test images: one image = 0.28 points), {r['epochs']} epochs, seeds 0–{r['seeds'] - 1}, "
        "mean ± std. **defaults**: `SelfCompression(export_path=...)` and nothing else "
        f"(γ = {r['default_gamma']}, `freeze_bits_after=0.8`, removal every 100 steps); **tuned**: γ = {r['gamma']}, "
        f"`freeze_bits_after={r['freeze_bits_after']}`, removal every 50 steps. The file ratio is the packed "
        "safetensors file against `torch.save` of the float32 state dict.",
        "",
        "| run | test accuracy | bits ratio | packed file / float file | packed bytes | step time ratio | "
        "channels removed | reload exact |",
        "|---|---|---|---|---|---|---|---|",
        f"| float | {pm(r['float_acc_mean_std'], True)} | 1 | 1 | – | 1 | 0 | – |",
    ]
    for name in ("defaults", "tuned"):
        lines.append(
            f"| {name} | {pm(r[f'{name}_acc_mean_std'], True)} | {pm(r[f'{name}_bits_ratio_mean_std'])} | "
            f"{pm(r[f'{name}_file_bytes_ratio_mean_std'])} | {r[f'{name}_packed_bytes']} | "
            f"{pm(r[f'{name}_step_time_ratio_mean_std'])} | {r[f'{name}_channels_removed']} | "
            f"{r[f'{name}_reload_exact']} |"
        )
    lines += ["", f"Per-seed test accuracy: `{json.dumps(r['per_seed_acc'])}`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
