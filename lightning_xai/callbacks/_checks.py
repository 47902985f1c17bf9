"""Set-up checks shared by the callbacks."""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "refuse_sharded_strategies",
    "resolve_export_path",
    "refuse_duplicates",
    "weight_averaging_order",
    "refresh_averaged_copies",
]

_SHARDED = ("FSDP", "DeepSpeed", "ModelParallel")


def resolve_export_path(path: str | None, trainer: Any) -> str | None:
    """``path`` with ``{log_dir}`` replaced by the run's log folder (the logger's versioned folder, or the Trainer's
    ``default_root_dir`` without a logger), so each run's export lands next to its logs instead of overwriting the
    previous run's."""
    if path is None or "{log_dir}" not in path:
        return path
    log_dir = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None) or "."
    return path.replace("{log_dir}", str(log_dir))


def refuse_duplicates(trainer: Any, callback: Any) -> None:
    """Two instances of one callback class in a Trainer would install, penalise or prune twice: refuse."""
    same = [cb for cb in getattr(trainer, "callbacks", []) if type(cb) is type(callback)]
    if len(same) > 1:
        name = type(callback).__name__
        raise ValueError(
            f"the Trainer has {len(same)} {name} callbacks; use one (it covers the whole model: select layers with "
            "its own arguments)"
        )


def refuse_lrp_with_self_compression(trainer: Any) -> None:
    """SelfCompression and LRPCompression in one Trainer: both quantize the weights. LRP's plans write pruned,
    mixed-precision weights in place, but under SelfCompression's quantizers a layer's weight is computed from the
    latent one and learned bit depths, so the write would change a temporary (the model would stay as it was while the
    report said otherwise). Called in both callbacks' ``setup``, so whichever comes first refuses before its model
    changes."""
    names = {type(cb).__name__ for cb in trainer.callbacks}
    if {"SelfCompression", "LRPCompression"} <= names:
        raise ValueError(
            "LRPCompression cannot run in the same Trainer as SelfCompression: both quantize the weights (use one of "
            "them, or run LRPCompression on the plain model SelfCompression exported: `load_compressed` into a fresh "
            "instance)"
        )


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


def _averaging_types() -> tuple[type, ...]:
    """Lightning's callbacks that keep an averaged copy of the model (``WeightAveraging`` and its
    ``EMAWeightAveraging`` exist from Lightning 2.5; ``StochasticWeightAveraging`` in every supported version)."""
    from lightning.pytorch import callbacks

    names = ("WeightAveraging", "StochasticWeightAveraging")
    return tuple(t for t in (getattr(callbacks, n, None) for n in names) if isinstance(t, type))


def weight_averaging_order(trainer: Any, callback: Any, who: str, *, averaging_first: bool, why: str) -> bool:
    """Whether the Trainer has a weight-averaging callback; raise (``why`` says why) when one sits on the wrong side
    of ``callback``: after it when ``averaging_first``, before it otherwise.

    Those callbacks deep-copy the model in their ``setup`` and copy the averaged tensors back by position when
    training ends, so ``SelfCompression`` (which installs its quantizers at setup) must come before them and
    ``PreservationGuard`` (which judges, and may roll back, the model at train end) after them.
    """
    found = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, _averaging_types())]
    if not found:
        return False
    callbacks = list(trainer.callbacks)
    mine = callbacks.index(callback)
    wrong = [cb for cb in found if (callbacks.index(cb) > mine) == averaging_first]
    if wrong:
        name = type(wrong[0]).__name__
        side, fix = (
            ("after", f"[..., {name}(...), {who}(...)]")
            if averaging_first
            else ("before", f"[{who}(...), {name}(...)]")
        )
        raise ValueError(
            f"`callbacks` lists {name} {side} {who}: {why}. Put {who} {'after' if averaging_first else 'before'} it, "
            f"e.g. `callbacks={fix}`"
        )
    return True


def refresh_averaged_copies(trainer: Any, pl_module: Any, who: str) -> None:
    """After ``who`` changed the model at fit end (removed channels or layers, pruned or quantized weights), give the
    weight-averaging callbacks a copy of the model as it now is (it already holds their average: they copied it back
    when training ended). They swap their copy in by position for every later ``trainer.validate`` and save it in
    checkpoints: a stale copy fails on changed shapes, or, worse, silently validates the unpruned model.

    Written by hand because Lightning offers no public way to do it: the copy lives in their ``_average_model``
    attribute (an ``AveragedModel`` around the module for ``WeightAveraging``, the module itself for
    ``StochasticWeightAveraging``); where that is not found, a warning says what will fail.
    """
    for cb in getattr(trainer, "callbacks", []):
        if not isinstance(cb, _averaging_types()):
            continue
        held = getattr(cb, "_average_model", None)
        if held is not None and isinstance(getattr(held, "module", None), type(pl_module)):
            held.module = copy.deepcopy(pl_module)
        elif held is not None and isinstance(held, type(pl_module)):
            cb._average_model = copy.deepcopy(pl_module)
        else:
            rank_zero_warn(
                f"{who} changed the model at fit end and could not update {type(cb).__name__}'s averaged copy: a "
                "later `trainer.validate` with this Trainer would swap that stale copy in; use a new Trainer for it"
            )
