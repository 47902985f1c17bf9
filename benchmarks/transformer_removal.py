"""Removal inside transformer blocks at a large size penalty: the small ViT and Lightning's demo Transformer (the
rows of ``benchmarks/coverage.py``) trained with ``SelfCompression(gamma=G)`` for ``S`` steps, 3 seeds.

Per run: whole heads dead (every value row at 0 bits, or the attention's ``out_proj`` silent) and removed; MLP hidden
units dead (at 0 bits, or idle: the MLP's second layer silent) and removed; the plain model's parameters and
multiply-accumulates per sample before and after (the packed export reloaded into a fresh full-size model); whether
that reload computes exactly what the trained model computes. Prints one JSON line per run and a summary line; the
full run rewrites the ``transformer_removal`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import replace_section  # noqa: E402
from coverage import _run_self_compression, models  # noqa: E402

ROWS = ("vit_small", "demo_transformer")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gamma", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one seed, 12 steps")
    args = parser.parse_args(argv)
    for logger in ("lightning.pytorch", "lightning.fabric", "lightning_xai"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    steps, seeds = (12, 1) if args.quick else (args.steps, args.seeds)
    table = models(args.quick)
    runs = []
    for name in ROWS:
        for seed in range(seeds):
            torch.manual_seed(seed)
            with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = _run_self_compression(_seeded(table[name], seed), steps, root, guard=False, gamma=args.gamma)
            mlp_dead = info["mlp_units_removed"] + info["mlp_units_dead_left"]
            run = {
                "model": name,
                "seed": seed,
                "heads_dead": info["dead_heads"],
                "heads_removed": info["heads_removed"],
                "mlp_units_dead": mlp_dead,
                "mlp_units_removed": info["mlp_units_removed"],
                "params_before": info["params_before"],
                "params_after": info["params_after"],
                "macs_before": info["macs_before"],
                "macs_after": info["macs_after"],
                "reload_exact": info["reload_exact"],
            }
            runs.append(run)
            print(json.dumps(run))
            sys.stdout.flush()
    summary: dict[str, Any] = {"gamma": args.gamma, "steps": steps, "seeds": seeds}
    for name in ROWS:
        mine = [r for r in runs if r["model"] == name]
        heads_dead = sum(r["heads_dead"] for r in mine)
        mlp_dead = sum(r["mlp_units_dead"] for r in mine)
        summary[name] = {
            "heads_removed_of_dead": round(sum(r["heads_removed"] for r in mine) / heads_dead, 3)
            if heads_dead
            else None,
            "heads_dead": heads_dead,
            "mlp_units_removed_of_dead": round(sum(r["mlp_units_removed"] for r in mine) / mlp_dead, 3)
            if mlp_dead
            else None,
            "mlp_units_dead": mlp_dead,
            "params_ratio": round(sum(r["params_after"] / r["params_before"] for r in mine) / len(mine), 3),
            "macs_ratio": round(sum(r["macs_after"] / r["macs_before"] for r in mine) / len(mine), 3),
            "reload_exact": all(r["reload_exact"] for r in mine),
        }
    print(json.dumps(summary))
    if not args.quick:
        _write(runs, summary)
    return summary


def _seeded(make, seed: int):
    """The row's builder with the model initialised from ``seed`` (the data stay the same)."""

    def build():
        net, dm = make()
        torch.manual_seed(seed)
        for module in net.modules():
            if hasattr(module, "reset_parameters") and module is not net:
                module.reset_parameters()
        return net, dm

    return build


def _write(runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    lines = [
        "| model | seed | heads removed / dead | MLP hidden units removed / dead | parameters | MACs per sample | "
        "reload |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['model']} | {r['seed']} | {r['heads_removed']}/{r['heads_dead']} | "
            f"{r['mlp_units_removed']}/{r['mlp_units_dead']} | {r['params_before']:,} → {r['params_after']:,} | "
            f"{r['macs_before']:,} → {r['macs_after']:,} | {'exact' if r['reload_exact'] else 'DIFFERS'} |"
        )
    body = (
        f"`SelfCompression(gamma={summary['gamma']}, init_bits=3, freeze_bits_after=1.0)` for {summary['steps']} "
        "steps on the coverage rows' data (ViT: 2-class 32×32 templates; demo Transformer: next-token "
        "prediction on arithmetic sequences), removal every third of the run and at fit end. A head is dead when every "
        "value row is at 0 bits or its attention's out_proj is silent; an MLP hidden unit when it is at 0 bits or the "
        "MLP's second layer is silent (idle). One unit per MLP is kept so shapes stay valid (it outputs zero).\n\n"
        + "\n".join(lines)
        + f"\n\n`{json.dumps(summary)}`\n"
    )
    replace_section("transformer_removal", body, "python benchmarks/transformer_removal.py")


if __name__ == "__main__":
    main()
