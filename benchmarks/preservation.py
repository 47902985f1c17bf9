"""Safety loop benchmark: the same aggressive γ without the guard, with it, and with a random set of equal size.

    python benchmarks/preservation.py [--quick]

Per dataset (digits with the LeNet CNN, census names with the character attention model): a float model is trained,
then compressed from it with SelfCompression at an aggressive γ for the same budget in three variants. Prints one JSON
object on its last line; the full mode rewrites its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_trainer, update_benchmarks_md  # noqa: E402

from lightning_xai.callbacks import PreservationGuard, SelfCompression  # noqa: E402
from lightning_xai.data import DigitsDataModule, NamesDataModule  # noqa: E402
from lightning_xai.models import ImageClassifier  # noqa: E402

SETTINGS = {
    "digits": {"model": "lenet", "dm": lambda seed: DigitsDataModule(batch_size=64, seed=seed), "shape": (1, 8, 8)},
    "names": {
        "model": "char_transformer",
        "dm": lambda seed: NamesDataModule(batch_size=64, seed=seed),
        "shape": (12,),
    },
}


_trainer = quiet_trainer


def run_dataset(
    name: str,
    pre_epochs: int,
    epochs: int,
    gamma: float,
    seed: int,
    fraction: float,
    freeze: float,
    cooldown: int,
    lam: float = 0.5,
) -> dict:
    cfg = SETTINGS[name]
    pl.seed_everything(seed, verbose=False)
    dm = cfg["dm"](seed)
    base = ImageClassifier(cfg["model"], input_shape=cfg["shape"], num_classes=dm.num_classes, lr=2e-3)
    # float phase: early stopping on validation accuracy (never on test), so the float model does not over-fit
    pre = quiet_trainer(pre_epochs, [EarlyStopping("val/acc", mode="max", patience=3)], validate=True)
    pre.fit(base, dm)
    float_acc = float(_trainer(1, []).test(base, dm, verbose=False)[0]["test/acc"])
    n_train = len(dm.dataset("train"))

    def compress(guard: PreservationGuard | None) -> tuple[float, float, dict]:
        pl.seed_everything(seed, verbose=False)
        model = copy.deepcopy(base)
        sc = SelfCompression(gamma=gamma, remove_every_n_steps=50, log_every_n_steps=0, freeze_bits_after=freeze)
        cbs = [sc] + ([guard] if guard is not None else [])
        trainer = _trainer(epochs, cbs)
        trainer.fit(model, dm)
        acc = float(trainer.test(model, dm, verbose=False)[0]["test/acc"])
        return acc, sc.compressor.size().bits_ratio, {}

    unsafe_acc, unsafe_bits, _ = compress(None)
    guard = PreservationGuard(
        fraction=fraction, lam=lam, check_every_n_steps=10, max_drop=0.02, seed=seed, cooldown_steps=cooldown
    )
    safe_acc, safe_bits, _ = compress(guard)
    rng = np.random.default_rng(seed + 1)
    random_idx = sorted(rng.choice(n_train, size=len(guard.indices), replace=False).tolist())
    rguard = PreservationGuard(
        fraction=fraction,
        lam=lam,
        check_every_n_steps=10,
        max_drop=0.02,
        seed=seed,
        indices=random_idx,
        cooldown_steps=cooldown,
    )
    random_acc, random_bits, _ = compress(rguard)
    return {
        "float_acc": round(float_acc, 4),
        "unsafe_acc": round(unsafe_acc, 4),
        "safe_acc": round(safe_acc, 4),
        "random_set_acc": round(random_acc, 4),
        "unsafe_bits_ratio": round(unsafe_bits, 4),
        "safe_bits_ratio": round(safe_bits, 4),
        "random_set_bits_ratio": round(random_bits, 4),
        "restorations": len(guard.restorations),
        "random_set_restorations": len(rguard.restorations),
        "preservation_fraction": round(len(guard.indices) / n_train, 4),
        "threshold": round(guard.threshold, 4),
        "final_preservation_acc": round(guard.last_accuracy, 4),
        "random_set_final_preservation_acc": round(rguard.last_accuracy, 4),
        "rolled_back_at_end": guard.rolled_back,
        "random_set_rolled_back_at_end": rguard.rolled_back,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gamma", type=float, default=2.0, help="aggressive size penalty")
    parser.add_argument("--freeze-bits-after", type=float, default=1.0, help="1.0: bits learned until the end")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--cooldown", type=int, default=20, help="steps a restored channel is held")
    parser.add_argument("--lam", type=float, default=0.5, help="weight of the preservation loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default="digits,names")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    pre, epochs = (5, 4) if args.quick else (30, 20)
    result: dict = {
        "benchmark": "preservation",
        "mode": "quick" if args.quick else "full",
        "gamma": args.gamma,
        "freeze_bits_after": args.freeze_bits_after,
        "lam": args.lam,
    }
    for name in args.datasets.split(","):
        result[name] = run_dataset(
            name, pre, epochs, args.gamma, args.seed, args.fraction, args.freeze_bits_after, args.cooldown, args.lam
        )
    if not args.quick:
        update_benchmarks_md(
            "preservation", result, "python benchmarks/preservation.py " + " ".join(argv or sys.argv[1:])
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
