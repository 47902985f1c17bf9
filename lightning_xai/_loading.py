"""Loading saved state into a fresh model: key prefixes (a LightningModule or its inner ``nn.Module``) and a clear
error when the architecture differs (class count, widths) instead of a silent resize or a raw key error."""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

__all__ = ["align_prefix", "check_architecture", "load_into"]


def align_prefix(model: nn.Module, state: dict[str, Tensor], shapes: dict[str, Any] | None = None):
    """``state`` (and ``shapes``) re-keyed so their keys are ``model``'s: saved from a LightningModule (``net.x``) and
    loaded into its inner module (``x``), or the other way round. Unchanged when no single prefix fits."""
    want = set(model.state_dict())
    have = set(state)
    if not want or not have or have == want:
        return state, shapes
    candidates: set[tuple[str, str]] = set()
    sample_want, sample_have = sorted(want)[:50], sorted(have)[:50]
    for f in sample_have:
        for m in sample_want:
            if f.endswith("." + m):
                candidates.add((f[: len(f) - len(m)], ""))
            elif m.endswith("." + f):
                candidates.add(("", m[: len(m) - len(f)]))
    for strip, add in candidates:
        renamed = {add + k[len(strip) :]: k for k in have if k.startswith(strip)}
        if set(renamed) == want:
            new_state = {new: state[old] for new, old in renamed.items()}
            new_shapes = (
                None if shapes is None else {add + k[len(strip) :]: v for k, v in shapes.items() if k.startswith(strip)}
            )
            return new_state, new_shapes
    return state, shapes


def check_architecture(
    model: nn.Module, state: dict[str, Tensor], path: Any, shapes: dict[str, Any] | None = None
) -> None:
    """Refuse to load ``state`` into a different architecture. With ``shapes`` (the exported model's shapes before
    any removal) every tensor of ``model`` must have exactly that shape; without, the saved tensors may only be
    smaller (channels removed), never larger or of another rank."""
    current = model.state_dict()
    where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"{where!r} does not match `model`: missing {missing[:4]}, unexpected {unexpected[:4]}. Pass a fresh "
            "instance of the exported architecture (the LightningModule or its inner nn.Module both work)"
        )
    bad = []
    for key, value in current.items():
        if shapes is not None and key in shapes:
            if list(value.shape) != list(shapes[key]):
                bad.append(f"{key}: saved from {tuple(shapes[key])}, `model` has {tuple(value.shape)}")
        else:
            saved = state[key].shape
            if len(saved) != value.dim() or any(s > c for s, c in zip(saved, value.shape)):
                bad.append(f"{key}: saved {tuple(saved)}, `model` has {tuple(value.shape)}")
    if bad:
        raise ValueError(
            f"{where!r} was exported from another architecture than `model` ("
            + "; ".join(bad[:3])
            + "): build the model with the same class count and widths before loading"
        )


def load_into(model: nn.Module, state: dict[str, Tensor], path: Any, shapes: dict[str, Any] | None = None) -> None:
    """Align prefixes, check the architecture, resize pruned layers to the saved shapes and load (strict)."""
    from lightning_xai.pruning.surgery import resize_to_state_dict

    state, shapes = align_prefix(model, state, shapes)
    check_architecture(model, state, path, shapes)
    resize_to_state_dict(model, state)
    model.load_state_dict(state, strict=True)
