"""DDP on CPU: ``strategy="ddp"`` with 2 gloo processes (tests/ddp_run.py, launched as a script so that Lightning can
re-launch it for rank 1) against the same run in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

HERE = Path(__file__).resolve().parent


def _run(prefix: Path, devices: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(HERE / "ddp_run.py"), str(prefix), str(devices)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(Path(f"{prefix}.{rank}.json").read_text()) for rank in range(devices)]


def test_ddp_ranks_agree_and_match_the_single_process_run(tmp_path):
    rank0, rank1 = _run(tmp_path / "ddp", 2)
    (single,) = _run(tmp_path / "single", 1)
    assert rank0["world"] == 2 and single["world"] == 1
    assert rank0["quantizers"] == rank1["quantizers"]  # bit depths and exponents stayed in sync
    assert rank0["state"] == rank1["state"]  # every rank ends with the same (pruned) model
    assert rank0["restorations"] == rank1["restorations"]  # one decision, broadcast
    assert rank0["plan"] == rank1["plan"] and rank0["plan"]  # C-SWAP ran once; its plan applied everywhere
    assert rank0["layers_pruned"] == rank1["layers_pruned"]
    assert abs(rank0["test_acc"] - single["test_acc"]) <= 0.05  # same global batch; DDP shards the data
    assert abs(rank0["params"] - single["params"]) <= 0.05 * single["params"]
    assert rank0["params"] < 0.75 * 20166  # C-SWAP removed ~30 % of the parameters on both
    # with Lightning's EMA (>= 2.5) in the run: its copy is the pruned model on every rank
    expected = True if hasattr(pl.callbacks, "EMAWeightAveraging") else None
    assert [r["average_is_model"] for r in (rank0, rank1, single)] == [expected] * 3
