"""Per-step overhead of the training-time callbacks: aten ops, host synchronisations and step time.

    python benchmarks/overhead.py [--quick] [--device cpu|cuda] [--sync-debug]

For torchvision ResNet-50 (64×64 inputs, batch 8, untrained) and the digits LeNet (batch 64), three Trainer runs on
the same synthetic data: plain, ``SelfCompression``, ``SelfCompression + PreservationGuard``. Only steps that neither
log nor remove are measured (``log_every_n_steps=0``, ``remove_every_n_steps=0``, guard checks far apart); the first
steps (batch-norm detection, set building, warm-up) are skipped.

* ops: every aten op the step dispatches, counted by a ``TorchDispatchMode`` (views included), from the start of
  ``on_train_batch_start`` to the end of ``on_train_batch_end`` (forward, backward, optimizer steps, callbacks).
* syncs: the ops that make the host wait for the device on CUDA — ``aten::_local_scalar_dense`` (``.item()``,
  ``float(t)``), ``aten::is_nonzero`` (``bool(t)``), ``aten::equal``, data-dependent shapes (``nonzero``,
  ``masked_select``) and device→host copies. On the CPU they are counted the same way (they would sync on CUDA).
* time: median wall time of the measured steps, the runs measured alternately in rounds (same process, same
  threads; 8 rounds in a full run, since a run's speed moves by up to ±20 % from one run to the next on a shared CPU);
  each round's ratio and their quartiles are reported too; ``torch.cuda.synchronize()`` closes each step on CUDA.

The callbacks run with their defaults: on the CPU ``compile="auto"`` fuses ResNet-50's quantizer with torch.compile
(≥ 2 M weights; its first steps compile and are skipped) and leaves the LeNet's eager. Full runs also time and count
``SelfCompression(compile=False)`` (the eager quantizer, ``*_sc_eager``) for comparison.
``--sync-debug`` (CUDA) runs the measured steps under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising
call in them raises. Prints one JSON object on its last line; the full CPU run rewrites its BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import update_benchmarks_md  # noqa: E402

from lightning_xai import PreservationGuard, SelfCompression  # noqa: E402
from lightning_xai.models import ImageClassifier  # noqa: E402

SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "nonzero_static"}


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops by name and the ones that synchronise with the device."""

    def __init__(self, host_scalars: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.host_scalars = host_scalars  # ids of tensors that live on the CPU even in a CUDA run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._overloadpacket.__name__
        self.ops[name] += 1
        if name in SYNC_OPS and not (args and id(args[0]) in self.host_scalars):
            self.syncs[name] += 1
        elif name in ("_to_copy", "copy_", "to"):
            src = args[1] if name == "copy_" else args[0]
            dst_dev = args[0].device if name == "copy_" else (kwargs or {}).get("device")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_dev is not None:
                if torch.device(dst_dev).type == "cpu":
                    self.syncs[f"{name}(device->host)"] += 1
        return func(*args, **(kwargs or {}))


class StepProbe(pl.Callback):
    """Opens a measurement at the first ``on_train_batch_start`` hook and closes it after every other callback's
    ``on_train_batch_end`` (``first`` and ``last`` are two instances placed at both ends of the callback list)."""

    def __init__(self, shared: dict, first: bool, skip: int, count_ops: bool, sync_debug: bool) -> None:
        self.shared, self.first, self.skip, self.count_ops, self.sync_debug = shared, first, skip, count_ops, sync_debug

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if not self.first or trainer.global_step < self.skip:
            return
        stack = contextlib.ExitStack()
        if self.count_ops:
            # torch.optim keeps the step counters of non-fused optimizers on the CPU even for CUDA parameters, so
            # reading them (Adam's bias correction) is no device sync: they are not counted as syncs
            steps = {
                id(state["step"])
                for opt in trainer.optimizers
                for state in opt.state.values()
                if isinstance(state.get("step"), torch.Tensor) and not opt.defaults.get("fused")
            }
            counter = stack.enter_context(OpCounter(steps))
            self.shared.setdefault("counters", []).append(counter)
        _sync(pl_module)  # the explicit synchronisations of the measurement stay outside the debug mode
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode("error")
            stack.callback(torch.cuda.set_sync_debug_mode, "default")
        self.shared["t0"] = time.perf_counter()
        self.shared["stack"] = stack

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.first or "stack" not in self.shared:
            return
        stack = self.shared.pop("stack")
        stack.close()
        _sync(pl_module)
        self.shared.setdefault("times", []).append(time.perf_counter() - self.shared.pop("t0"))


def _sync(module: torch.nn.Module) -> None:
    if next(module.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def _model(name: str) -> tuple[ImageClassifier, TensorDataset, int]:
    g = torch.Generator().manual_seed(0)
    if name == "resnet50":
        import torchvision

        net = torchvision.models.resnet50(num_classes=10)
        data = TensorDataset(torch.randn(256, 3, 64, 64, generator=g), torch.randint(0, 10, (256,), generator=g))
        return ImageClassifier(net, lr=1e-3), data, 8
    net_model = ImageClassifier("lenet", input_shape=(1, 8, 8), num_classes=10)
    data = TensorDataset(torch.randn(1024, 1, 8, 8, generator=g), torch.randint(0, 10, (1024,), generator=g))
    return net_model, data, 64


def _callbacks(variant: str) -> list[pl.Callback]:
    out: list[pl.Callback] = []
    if variant in ("sc", "sc_guard", "sc_eager"):
        compile_ = False if variant == "sc_eager" else "auto"  # the default
        out.append(SelfCompression(gamma=0.05, log_every_n_steps=0, remove_every_n_steps=0, compile=compile_))
    if variant == "sc_guard":
        out.append(PreservationGuard(fraction=0.1, check_every_n_steps=10_000, batch_size=64))
    return out


def _run(name: str, variant: str, steps: int, skip: int, device: str, count_ops: bool, sync_debug: bool) -> dict:
    pl.seed_everything(0, verbose=False)
    model, data, batch = _model(name)
    shared: dict[str, Any] = {}
    probes = [StepProbe(shared, True, skip, count_ops, False), StepProbe(shared, False, skip, count_ops, False)]
    if sync_debug:
        probes[0].sync_debug = True
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        max_steps=skip + steps,
        callbacks=[probes[0], *_callbacks(variant), probes[1]],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=10_000,
    )
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    trainer.fit(model, loader)
    out: dict[str, Any] = {"times": shared.get("times", [])}
    counters: list[OpCounter] = shared.get("counters", [])
    if counters:
        out["ops_per_step"] = statistics.median(sum(c.ops.values()) for c in counters)
        out["syncs_per_step"] = statistics.median(sum(c.syncs.values()) for c in counters)
        syncs: Counter[str] = Counter()
        for c in counters:
            syncs.update(c.syncs)
        out["sync_kinds"] = dict(syncs)
        top: Counter[str] = Counter()
        for c in counters:
            top.update(c.ops)
        out["ops"] = {k: v // len(counters) for k, v in top.items()}
    return out


def measure(name: str, steps: int, rounds: int, device: str, sync_debug: bool, eager: bool) -> dict[str, Any]:
    skip = 3
    res: dict[str, Any] = {}
    variants = ["plain", "sc", "sc_guard"] + (["sc_eager"] if eager else [])
    counts = {v: _run(name, v, 3, skip, device, True, False) for v in variants}
    for v, c in counts.items():
        res[f"ops_per_step_{v}"] = c["ops_per_step"]
        res[f"syncs_per_step_{v}"] = c["syncs_per_step"]
        if c["sync_kinds"]:
            res[f"sync_kinds_{v}"] = c["sync_kinds"]
    for v in variants[1:]:  # where the extra ops come from
        extra = Counter(counts[v]["ops"])
        extra.subtract(counts["plain"]["ops"])
        res[f"extra_ops_{v}"] = dict(extra.most_common(10))
    times: dict[str, list[float]] = {v: [] for v in variants}
    per_round: dict[str, list[float]] = {v: [] for v in variants[1:]}
    for _ in range(rounds):  # alternate the variants so the machine's drifts hit all alike
        medians = {}
        for v in variants:
            # a fused (compiled) quantizer compiles in its first steps: skip more of them
            steps_skip = skip + 3 if v in ("sc", "sc_guard") else skip
            got = _run(name, v, steps, steps_skip, device, False, sync_debug and v != "plain")["times"]
            times[v] += got
            medians[v] = statistics.median(got)
        for v in variants[1:]:
            per_round[v].append(round(medians[v] / medians["plain"], 3))
    med = {v: statistics.median(t) for v, t in times.items()}
    res.update({f"step_ms_{v}": round(1e3 * m, 3) for v, m in med.items()})
    # A run's step time is steady within the run but moves by up to ±20 % from one run (one Trainer, one model) to the
    # next on a shared CPU, so the ratio of a single pair of runs is noise: keep each round's ratio and their quartiles.
    for v, ratios in per_round.items():
        res[f"step_time_ratio_{v}_per_round"] = ratios
        if len(ratios) >= 2:
            q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            res[f"step_time_ratio_{v}_iqr"] = [round(q1, 3), round(q3, 3)]
    res["ops_ratio_sc"] = round(res["ops_per_step_sc"] / res["ops_per_step_plain"], 3)
    res["ops_ratio_sc_guard"] = round(res["ops_per_step_sc_guard"] / res["ops_per_step_plain"], 3)
    res["step_time_ratio_sc"] = round(med["sc"] / med["plain"], 3)
    res["step_time_ratio_sc_guard"] = round(med["sc_guard"] / med["plain"], 3)
    if eager:
        res["ops_ratio_sc_eager"] = round(res["ops_per_step_sc_eager"] / res["ops_per_step_plain"], 3)
        res["step_time_ratio_sc_eager"] = round(med["sc_eager"] / med["plain"], 3)
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="LeNet only, few steps (CI smoke run)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sync-debug", action="store_true", help="CUDA: error on any synchronising call in a step")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--defaults-only", action="store_true", help="skip the SelfCompression(compile=False) runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    steps = args.steps or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 8)
    models = ("lenet",) if args.quick else ("resnet50", "lenet")
    result: dict[str, Any] = {"benchmark": "overhead", "mode": "quick" if args.quick else "full", "device": args.device}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    eager = not (args.quick or args.defaults_only)
    per_model = {}
    for name in models:
        per_model[name] = measure(name, steps, rounds, args.device, args.sync_debug, eager)
        print(
            json.dumps({"part": name, **per_model[name]}), flush=True
        )  # a later model that runs long loses only itself
    head = per_model[models[0]]  # ResNet-50 in the full run
    for key in (
        "ops_ratio_sc",
        "ops_ratio_sc_guard",
        "step_time_ratio_sc",
        "step_time_ratio_sc_guard",
        "ops_ratio_sc_eager",
        "step_time_ratio_sc_eager",
    ):
        if key in head:
            result[key] = head[key]
    result["syncs_per_step_sc"] = head["syncs_per_step_sc"]
    result["syncs_per_step_sc_guard"] = head["syncs_per_step_sc_guard"]
    result["models"] = per_model
    if not args.quick and args.device == "cpu":
        cmd = "python benchmarks/overhead.py" + " ".join(argv or sys.argv[1:]).join([" ", ""]).rstrip()
        update_benchmarks_md("overhead", result, cmd)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
