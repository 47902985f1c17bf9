"""Argument validation shared by every public entry point: errors name the argument, the value and what is allowed."""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "validate_number",
    "validate_bool",
    "validate_export_path",
    "validate_names",
    "check_layer_names",
    "require_training",
]


def validate_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
    allow_none: bool = False,
) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a number in the allowed range."""
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"`{name}` must be {kind}, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"`{name}` must be <= {high}, got {value!r}")


def validate_bool(name: str, value: Any) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is ``True`` or ``False`` (``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")


def validate_export_path(name: str, value: Any) -> str | None:
    """An export file path (``str``/``PathLike``, or None), checked before training: not empty, not a folder, and
    inside a folder that exists or can be created. Returns it as a string. ``{log_dir}`` is kept for the callbacks
    to fill in with the run's log folder at fit end."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"`{name}` must be a file path (str or os.PathLike) or None, got {value!r}")
    path = os.fspath(value)
    if not path.strip():
        raise ValueError(f"`{name}` must be a file path, got an empty string")
    if "{log_dir}" in path:
        return path
    if os.path.isdir(path):
        example = os.path.join(path, "model.safetensors")
        raise ValueError(f"`{name}`={path!r} is an existing folder; give a file path such as {example!r}")
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ValueError(f"`{name}`={path!r} cannot be written: {probe!r} is not a writable folder")
    return path


def validate_names(name: str, value: Any, what: str = "layer names") -> tuple[str, ...]:
    """A list or tuple of strings (a single string is refused: ``'fc'`` would become ``('f', 'c')``)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"`{name}` must be a list or tuple of {what} (strings), got {value!r}")
    return tuple(value)


def check_layer_names(name: str, names: Any, model: Any) -> None:
    """Raise a ``ValueError`` naming ``name`` for every entry of ``names`` that is not a module of ``model``, with the
    closest existing names as suggestions (a typo would otherwise be ignored silently)."""
    import difflib

    known = [n for n, _ in model.named_modules() if n]
    unknown = [n for n in names if n not in set(known)]
    if unknown:
        hints = {n: difflib.get_close_matches(n, known, n=3, cutoff=0.5) for n in unknown}
        detail = "; ".join(f"{n!r} (did you mean {h}?)" if h else repr(n) for n, h in hints.items())
        raise ValueError(f"`{name}` names layers that the model does not have: {detail}")


def require_training(trainer: Any, who: str) -> None:
    """Raise ``RuntimeError`` when ``trainer.fit`` ran no optimizer step (an empty training split, ``max_epochs=0``…):
    a recipe must not write an untrained "compressed" model and exit successfully."""
    if getattr(trainer, "global_step", 0) == 0:
        raise RuntimeError(
            f"{who}: no training step ran (is the training split empty? `--data-dir` holds too few images, or "
            "`max_epochs`/`limit_train_batches` is 0)"
        )
