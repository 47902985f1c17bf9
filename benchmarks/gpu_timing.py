"""GPU timings (run by tools/gpu_check.sh on a CUDA machine; CPU runs are for smoke tests only).

    python benchmarks/gpu_timing.py [--quick] [--device cuda]

1. ResNet-50, AMP (``precision="16-mixed"``), batch 128 of synthetic 224×224 images: median step time of plain
   training vs ``SelfCompression`` vs ``SelfCompression + PreservationGuard`` (steps that neither log nor remove),
   the three runs alternated in rounds; each step closed by ``torch.cuda.synchronize()``. Then plain vs
   ``SelfCompression`` once more with the model and its inputs in channels_last.
2. C-SWAP's analysis of a torchvision ResNet-18 (32×32 inputs, 10 classes, 16 samples a class): the fast engine vs the
   reference engine — seconds, neurons/s, and whether they take the same decisions (how many neurons' categories
   differ when they do not); on CUDA once with PyTorch's defaults (cuDNN may use TF32) and once in full fp32.

Prints one JSON line per part as it ends, and one JSON object with all of them on its last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import StepProbe  # noqa: E402

from lightning_xai import PreservationGuard, SelfCompression  # noqa: E402
from lightning_xai.models import ImageClassifier  # noqa: E402
from lightning_xai.pruning.cswap import cswap_order  # noqa: E402
from lightning_xai.pruning.units import find_units  # noqa: E402


class _ChannelsLast(torch.nn.Module):
    """The input in the channels_last layout (the model's parameters are converted with ``model.to``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def _step_times(
    variant: str,
    device: str,
    precision: str,
    batch: int,
    side: int,
    steps: int,
    skip: int,
    channels_last: bool = False,
) -> list:
    import torchvision

    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    n = batch * 4
    data = TensorDataset(torch.randn(n, 3, side, side, generator=g), torch.randint(0, 10, (n,), generator=g))
    net = torchvision.models.resnet50(num_classes=10)
    if channels_last:
        net = torch.nn.Sequential(_ChannelsLast(), net).to(memory_format=torch.channels_last)
    model = ImageClassifier(net, lr=1e-3)
    callbacks: list[pl.Callback] = []
    if variant != "plain":
        callbacks.append(SelfCompression(gamma=0.05, log_every_n_steps=0, remove_every_n_steps=0))
    if variant == "sc_guard":
        callbacks.append(PreservationGuard(fraction=0.1, check_every_n_steps=10_000, batch_size=64))
    shared: dict[str, Any] = {}
    probes = [StepProbe(shared, True, skip, False, False), StepProbe(shared, False, skip, False, False)]
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=skip + steps,
        callbacks=[probes[0], *callbacks, probes[1]],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=batch, shuffle=True, drop_last=True))
    return shared.get("times", [])


def resnet50_amp(device: str, quick: bool, channels_last: bool = False) -> dict[str, Any]:
    batch, side = (8, 64) if quick else (128, 224)
    steps, rounds, skip = (2, 1, 2) if quick else (10, 2, 5)
    precision = "16-mixed" if device == "cuda" else "bf16-mixed"
    variants = ("plain", "sc") if channels_last else ("plain", "sc", "sc_guard")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in times:
            times[variant] += _step_times(variant, device, precision, batch, side, steps, skip, channels_last)
    med = {v: statistics.median(t) for v, t in times.items()}
    return {
        "precision": precision,
        "batch": batch,
        "image_side": side,
        "channels_last": channels_last,
        **{f"step_ms_{v}": round(1e3 * m, 2) for v, m in med.items()},
        **{f"step_time_ratio_{v}": round(med[v] / med["plain"], 3) for v in variants[1:]},
    }


def cswap_resnet18(device: str, quick: bool, tf32: bool = True) -> dict[str, Any]:
    """C-SWAP's fast engine against the reference engine on a torchvision ResNet-18. ``tf32=False`` turns off
    TensorFloat-32 in cuDNN convolutions and matmuls (PyTorch lets cuDNN use it by default): with it on, the two
    engines' different batchings round differently, which can move neurons whose test statistic sits at a
    threshold into another category."""
    import torchvision

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        torch.manual_seed(0)
        net = torchvision.models.resnet18(num_classes=10).to(device).eval()
        per_class = 4 if quick else 16
        x = torch.randn(10 * per_class, 3, 32, 32, device=device)
        with torch.no_grad():  # labels the untrained net agrees with, so σ is not uniformly tiny
            y = net(x).argmax(1)
        units, _ = find_units(net, x[:2])
        if quick:
            units = units[:2]
        out: dict[str, Any] = {"tf32": tf32, "neurons": sum(u.size for u in units), "samples": int(x.shape[0])}
        orders = {}
        for mode in ("fast", "reference"):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            orders[mode] = cswap_order(net, units, x, y, mode=mode)
            if device == "cuda":
                torch.cuda.synchronize()
            out[f"{mode}_s"] = round(time.perf_counter() - start, 3)
            out[f"{mode}_neurons_per_s"] = round(orders[mode].neurons_per_s, 1)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    out["speedup"] = round(out["reference_s"] / out["fast_s"], 2)
    fast, ref = orders["fast"], orders["reference"]
    # decisions: every neuron's category and the non-critical removals (which and in what order) agree; the
    # critical tail is sorted by ξ, whose float rounding differs between the engines, so its order is reported apart
    out["same_decisions"] = (
        fast.non_critical == ref.non_critical
        and fast.order[: fast.non_critical] == ref.order[: ref.non_critical]
        and all(torch.equal(fast.category[u].cpu(), ref.category[u].cpu()) for u in ref.category)
    )
    out["same_full_order"] = fast.order == ref.order
    # how far apart they are when they differ
    out["category_disagreements"] = int(
        sum(int((fast.category[u].cpu() != ref.category[u].cpu()).sum()) for u in ref.category if u in fast.category)
    )
    out["non_critical_fast"], out["non_critical_ref"] = fast.non_critical, ref.non_critical
    out["non_critical_common"] = len(set(fast.order[: fast.non_critical]) & set(ref.order[: ref.non_critical]))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    result: dict[str, Any] = {"benchmark": "gpu_timing", "device": args.device, "quick": args.quick}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    parts = [
        ("resnet50_amp", resnet50_amp),
        # the layout AMP users train in: SelfCompression keeps it (quantized weights and gradients stay channels_last)
        ("resnet50_amp_channels_last", lambda device, quick: resnet50_amp(device, quick, channels_last=True)),
        ("cswap_resnet18", cswap_resnet18),
    ]
    if args.device == "cuda":  # the engines once more without TF32, to tell rounding from a logic difference
        parts.append(("cswap_resnet18_fp32", lambda device, quick: cswap_resnet18(device, quick, tf32=False)))
    for part, fn in parts:
        result[part] = fn(args.device, args.quick)
        print(json.dumps({"part": part, **result[part]}), flush=True)  # a later part that runs long loses only itself
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
