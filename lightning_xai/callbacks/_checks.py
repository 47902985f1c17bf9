"""Set-up checks shared by the callbacks."""

from __future__ import annotations

from typing import Any

__all__ = ["refuse_sharded_strategies"]

_SHARDED = ("FSDP", "DeepSpeed", "ModelParallel")


def refuse_sharded_strategies(trainer: Any, who: str) -> None:
    """Raise a clear error at set-up for strategies that shard parameters (FSDP, DeepSpeed, model parallel).

    The callbacks slice whole tensors (physical removal, pruning plans) and keep per-channel state next to them; with
    sharded parameters a rank holds a flat shard, and these strategies also restore callback state after
    ``on_fit_start``, so the bit optimizer and the batch-norm gates would be lost. DDP (``strategy="ddp"``) is
    supported.
    """
    name = type(getattr(trainer, "strategy", None)).__name__
    if any(tag in name for tag in _SHARDED):
        raise ValueError(
            f"{who} does not support `strategy`={name}: it shards the parameters, which {who} must see whole "
            "(and it restores callback state after on_fit_start). Use strategy='ddp' (or a single device)."
        )
