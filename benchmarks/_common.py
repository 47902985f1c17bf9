"""Shared helpers for benchmarks: step timing and BENCHMARKS.md updates."""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(pl.Callback):
    """Wall time of each training step (batch start → batch end, i.e. forward, backward and optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._t0)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def update_benchmarks_md(name: str, result: dict[str, Any], command: str) -> None:
    """Replace the section of ``name`` in BENCHMARKS.md with a table of ``result``."""
    rows = "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in result.items())
    replace_section(name, f"| metric | value |\n|---|---|\n{rows}", command)


def replace_section(name: str, body: str, command: str) -> None:
    """Replace (or append) the section of ``name`` in BENCHMARKS.md with ``body`` (markdown)."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section is rewritten by its benchmark script.\n"
    section = (
        f"<!-- {name}:start -->\n## {name}\n\n`{command}` (updated {time.strftime('%Y-%m-%d')})\n\n"
        f"{body}\n<!-- {name}:end -->"
    )
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def quiet_trainer(epochs: int, callbacks: list, validate: bool = False, **kw: Any) -> pl.Trainer:
    """Deterministic CPU Trainer without logging, checkpoints or progress bars (validation only if ``validate``);
    ``kw`` overrides or adds Trainer arguments (e.g. ``deterministic=False``)."""
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        **({"deterministic": True} | kw),
    )
