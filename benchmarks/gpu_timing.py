"""GPU timings (run by tools/gpu_check.sh on a CUDA machine; CPU runs are for smoke tests only).

    python benchmarks/gpu_timing.py [--quick] [--device cuda]

1. ResNet-50, AMP (``precision="16-mixed"``), batch 128 of synthetic 224×224 images: median step time of plain
   training vs ``SelfCompression`` vs ``SelfCompression + PreservationGuard`` (steps that neither log nor remove),
   the three runs alternated in rounds; each step closed by ``torch.cuda.synchronize()``. Then plain vs
   ``SelfCompression`` once more with the model and its inputs in channels_last.
2. C-SWAP's analysis of a torchvision ResNet-18 (32×32 inputs, 10 classes, 16 samples a class): the fast engine vs the
   reference engine — seconds, neurons/s, and whether they take the same decisions (how many neurons' categories
   differ when they do not); on CUDA once with PyTorch's defaults (cuDNN may use TF32) and once in full fp32.

3. A profile (``torch.profiler``) of 3 steps of part 1's plain and ``SelfCompression`` runs: device time per step and
   the operators whose self time per step SelfCompression adds most (on a CPU: CPU time).

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
from overhead import StepProbe, _sync  # noqa: E402

from lightning_xai import PreservationGuard, SelfCompression  # noqa: E402
from lightning_xai.models import ImageClassifier  # noqa: E402
from lightning_xai.pruning.cswap import cswap_order  # noqa: E402
from lightning_xai.pruning.units import find_units  # noqa: E402


class _ChannelsLast(torch.nn.Module):
    """The input in the channels_last layout (the model's parameters are converted with ``model.to``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


class _Profile(pl.Callback):
    """``torch.profiler`` around training steps ``start`` to ``start + steps - 1`` (whole steps: forward, backward,
    optimizer and every callback's hooks); the per-operator self times land in ``shared["profile"]``."""

    def __init__(self, shared: dict, start: int, steps: int) -> None:
        self.shared, self.start, self.steps, self.prof, self.cuda = shared, start, steps, None, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.start and self.prof is None:
            self.cuda = next(pl_module.parameters()).device.type == "cuda"
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if self.cuda else []
            )
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.prof is None or "profile" in self.shared or trainer.global_step < self.start + self.steps:
            return
        _sync(pl_module)
        self.prof.__exit__(None, None, None)
        times: dict[str, float] = {}
        for event in self.prof.key_averages():
            if self.cuda:
                us = getattr(event, "self_device_time_total", None)
                us = getattr(event, "self_cuda_time_total", 0.0) if us is None else us
            else:
                us = event.self_cpu_time_total
            if us:
                times[event.key] = times.get(event.key, 0.0) + us / 1e3 / self.steps  # ms per step
        self.shared["profile"] = times


def _step_times(
    variant: str,
    device: str,
    precision: str,
    batch: int,
    side: int,
    steps: int,
    skip: int,
    channels_last: bool = False,
    profile: bool = False,
) -> Any:
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
    if profile:
        callbacks = [*callbacks, _Profile(shared, skip, steps)]
    else:  # the step's clock opens before every other callback's hooks and closes after them
        callbacks = [
            StepProbe(shared, True, skip, False, False),
            *callbacks,
            StepProbe(shared, False, skip, False, False),
        ]
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=skip + steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=batch, shuffle=True, drop_last=True))
    return shared.get("profile", {}) if profile else shared.get("times", [])


def profile_resnet50_amp(device: str, quick: bool) -> dict[str, Any]:
    """Part 1's plain and SelfCompression steps under ``torch.profiler``: where SelfCompression's extra time goes."""
    batch, side = (8, 64) if quick else (128, 224)
    steps, skip = (1, 2) if quick else (3, 5)
    precision = "16-mixed" if device == "cuda" else "bf16-mixed"
    plain, sc = (_step_times(v, device, precision, batch, side, steps, skip, profile=True) for v in ("plain", "sc"))
    # operator rows (aten::…, kernels on CUDA): on CUDA the kernels carry the device time, the aten rows none
    added = {k: sc.get(k, 0.0) - plain.get(k, 0.0) for k in set(plain) | set(sc)}
    top = sorted(added.items(), key=lambda kv: -kv[1])[:15]
    return {
        "precision": precision,
        "batch": batch,
        "image_side": side,
        "steps_profiled": steps,
        "time_ms_per_step_plain": round(sum(plain.values()), 2),
        "time_ms_per_step_sc": round(sum(sc.values()), 2),
        "added_by_sc_ms_per_step": [[k[:90], round(v, 3)] for k, v in top],
    }


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
        ("profile_resnet50_amp", profile_resnet50_amp),
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
