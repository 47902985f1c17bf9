"""Per-weight pruning + two-level mixed precision (arXiv 2507.05286) and its packed export.

A :class:`WeightPlan` says, for one Linear/Conv weight tensor, which weights are kept and which of the kept ones get
the high bit width. Plans come from LRP relevance (:func:`relevance_plan`: prune ``R ≤ 0`` or below a quantile, then
high precision above the per-layer median of the remaining scores), from magnitudes (:func:`magnitude_plan`) or are
uniform (:func:`uniform_plan`). Quantization is symmetric and linear with one scale per (layer, precision group).

The packed file (safetensors, no pickle) stores per layer: a keep bit-mask (only if something was pruned), a
high/low bit-mask over the kept weights (only if two widths are used), the codes bit-packed at their widths, and
two float32 scales; every other tensor as is. :func:`packed_size` counts exactly those bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lightning_xai._loading import load_into
from lightning_xai.quantization.export import _atomic_save, pack_codes, read_tagged, unpack_codes

__all__ = [
    "WeightPlan",
    "relevance_plan",
    "magnitude_plan",
    "uniform_plan",
    "quantize_tensor",
    "apply_weight_plans",
    "packed_size",
    "export_mixed",
    "load_mixed",
]

_FORMAT = "lightning_xai.mixed/2"  # /2: with original shapes and a checksum; /1 files are still read
_OLD_FORMATS = ("lightning_xai.mixed/1",)


@dataclass
class WeightPlan:
    """Which weights of one tensor survive (``keep``) and which kept ones are stored at ``high_bits`` (``high``)."""

    keep: Tensor  # bool, weight shape
    high: Tensor  # bool, weight shape (subset of keep)
    high_bits: int
    low_bits: int

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    @property
    def pruned_fraction(self) -> float:
        return 1.0 - self.kept / self.keep.numel()

    @property
    def mean_bits(self) -> float:
        """Mean code width over the kept weights."""
        k = self.kept
        if k == 0:
            return 0.0
        h = int(self.high.sum())
        return (h * self.high_bits + (k - h) * self.low_bits) / k


def _check_bits(bits: tuple[int, int]) -> None:
    if not isinstance(bits, (tuple, list)) or len(bits) != 2:
        raise ValueError(f"`bits` must be (high, low) integers with 2 <= low <= high <= 16, got {bits!r}")
    hi, lo = bits
    if not (isinstance(hi, int) and isinstance(lo, int) and 2 <= lo <= hi <= 16):
        raise ValueError(f"`bits` must be (high, low) integers with 2 <= low <= high <= 16, got {bits!r}")


def relevance_plan(relevance: Tensor, prune: str | float = "nonpositive", bits: tuple[int, int] = (8, 4)) -> WeightPlan:
    """Prune ``R ≤ 0`` (``prune="nonpositive"``) or the ``round(prune·n)`` weights of lowest ``R`` (ties broken by
    position), then give the kept weights above the median of their scores ``bits[0]`` bits and the others
    ``bits[1]``.

    Example:
        >>> p = relevance_plan(torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0, 4.0]))
        >>> p.keep.tolist(), p.high.tolist()
        ([False, False, True, True, True, True], [False, False, False, False, True, True])
    """
    _check_bits(bits)
    r = relevance.detach().double()
    if prune == "nonpositive":
        keep = r > 0
    elif isinstance(prune, (int, float)) and not isinstance(prune, bool) and 0 <= prune < 1:
        # exactly round(prune · n) weights, the lowest scores first (a stable sort: ties do not widen the cut, as
        # ``r > quantile`` would, e.g. the many exact zeros of weights fed by dead units)
        flat = r.flatten()
        count = int(math.floor(float(prune) * flat.numel() + 0.5))
        keep_flat = torch.ones_like(flat, dtype=torch.bool)
        if count > 0:
            keep_flat[torch.argsort(flat, stable=True)[:count]] = False
        keep = keep_flat.reshape(r.shape)
    else:
        raise ValueError(f"`prune` must be 'nonpositive' or a quantile in [0, 1), got {prune!r}")
    high = torch.zeros_like(keep)
    if keep.any():
        median = r[keep].median()
        high = keep & (r > median)
    return WeightPlan(keep, high, bits[0], bits[1])


def magnitude_plan(weight: Tensor, prune_count: int, bits: int) -> WeightPlan:
    """Prune the ``prune_count`` smallest ``|w|``, store the rest uniformly at ``bits``."""
    _check_bits((bits, bits))
    flat = weight.detach().abs().flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if prune_count > 0:
        keep[torch.argsort(flat, stable=True)[:prune_count]] = False
    keep = keep.reshape(weight.shape)
    return WeightPlan(keep, keep.clone(), bits, bits)


def uniform_plan(weight: Tensor, bits: int) -> WeightPlan:
    """Keep everything, ``bits`` bits each."""
    _check_bits((bits, bits))
    keep = torch.ones_like(weight, dtype=torch.bool)
    return WeightPlan(keep, keep.clone(), bits, bits)


def _group(w: Tensor, mask: Tensor, bits: int) -> tuple[Tensor, float]:
    """Integer codes of ``w[mask]`` and their scale (symmetric, ``±(2^(bits-1) - 1)``). The clipping range is the
    one of 20 candidates (100 %…5 % of max |w|) with the smallest squared error — the usual MSE observer."""
    values = w[mask].double()
    qmax = 2 ** (bits - 1) - 1
    amax = float(values.abs().max()) if values.numel() else 0.0
    if amax == 0:
        return torch.zeros_like(values, dtype=torch.int64), 1.0
    best, best_err = 1.0, float("inf")
    for frac in np.linspace(1.0, 0.05, 20):
        scale = float(np.float32(amax * frac / qmax))  # stored as float32: quantize with that value
        err = float(((torch.round(values / scale).clamp(-qmax, qmax) * scale - values) ** 2).sum())
        if err < best_err:
            best, best_err = scale, err
    return torch.round(values / best).clamp(-qmax, qmax).to(torch.int64), best


def quantize_tensor(w: Tensor, plan: WeightPlan) -> Tensor:
    """The weights as the packed file restores them: pruned ones 0, the rest dequantized."""
    out = torch.zeros_like(w)
    low = plan.keep & ~plan.high
    for mask, bits in ((plan.high, plan.high_bits), (low, plan.low_bits)):
        if mask.any():
            codes, scale = _group(w, mask, bits)
            out[mask] = (codes.double() * scale).to(w.dtype)
    return out


def weight_attr(module: nn.Module) -> str:
    """The name of a layer's planned weight tensor: ``weight``, or ``in_proj_weight`` for ``nn.MultiheadAttention``
    (its packed query/key/value projection; ``out_proj`` is a layer of its own)."""
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def _weight(module: nn.Module) -> Tensor:
    return getattr(module, weight_attr(module))


def apply_weight_plans(model: nn.Module, plans: Mapping[str, WeightPlan]) -> dict[str, Tensor]:
    """Replace each planned layer's weight by its pruned, quantized version in place. Returns the old weights (for
    :func:`restore_weights`); nothing is changed if a plan does not fit its layer."""
    modules = dict(model.named_modules())
    for name, plan in plans.items():
        if name not in modules or not isinstance(getattr(modules[name], weight_attr(modules[name]), None), Tensor):
            raise ValueError(f"`plans` names {name!r}, which is not a layer with a weight in the model")
        if tuple(plan.keep.shape) != tuple(_weight(modules[name]).shape):
            raise ValueError(f"the plan of {name!r} has shape {tuple(plan.keep.shape)}, its weight another")
    saved = {}
    with torch.no_grad():
        for name, plan in plans.items():
            w = _weight(modules[name])
            saved[name] = w.detach().clone()
            w.copy_(quantize_tensor(w.detach(), _on(plan, w.device)))
    return saved


def _on(plan: WeightPlan, device: torch.device) -> WeightPlan:
    """``plan`` with its masks on ``device`` (plans are broadcast between ranks as CPU objects)."""
    if plan.keep.device == device:
        return plan
    return WeightPlan(plan.keep.to(device), plan.high.to(device), plan.high_bits, plan.low_bits)


def restore_weights(model: nn.Module, saved: Mapping[str, Tensor]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, w in saved.items():
            _weight(modules[name]).copy_(w)


# ----------------------------------------------------------------------------------------------------------------
# Packed file


def _bits_to_bytes(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.astype(np.uint8)) if bits.size else np.zeros(0, dtype=np.uint8)


def _layer_tensors(w: Tensor, plan: WeightPlan) -> tuple[dict[str, Tensor], dict]:
    """The packed tensors of one layer (built on the CPU: the file is written from the host)."""
    keep = plan.keep.flatten().cpu()
    high_all = plan.high.flatten().cpu()
    tensors: dict[str, Tensor] = {}
    meta = {"shape": list(w.shape), "high_bits": plan.high_bits, "low_bits": plan.low_bits}
    meta["has_keep"] = not bool(keep.all())
    if meta["has_keep"]:
        tensors["keep"] = torch.from_numpy(_bits_to_bytes(keep.numpy()))
    high_kept = high_all[keep]
    meta["mixed"] = plan.high_bits != plan.low_bits and not bool(high_kept.all()) and bool(high_kept.any())
    if meta["mixed"]:
        tensors["high"] = torch.from_numpy(_bits_to_bytes(high_kept.numpy()))
    flat = w.detach().flatten()
    scales = []
    for key, mask, bits in (("codes_high", high_all, plan.high_bits), ("codes_low", keep & ~high_all, plan.low_bits)):
        codes, scale = _group(flat, mask, bits) if mask.any() else (torch.zeros(0, dtype=torch.int64), 1.0)
        scales.append(scale)
        meta[f"n_{key}"] = int(codes.numel())
        stream = pack_codes(codes.numpy()[None, :], np.array([bits])) if codes.numel() else np.zeros(0, np.uint8)
        tensors[key] = torch.from_numpy(_bits_to_bytes(stream))
    tensors["scales"] = torch.tensor(scales, dtype=torch.float32)
    return tensors, meta


def _payload(model: nn.Module, plans: Mapping[str, WeightPlan]) -> tuple[dict[str, Tensor], dict]:
    tensors: dict[str, Tensor] = {}
    layers_meta = {}
    modules = dict(model.named_modules())
    planned = {f"{n}.{weight_attr(modules[n])}" for n in plans}
    for name, plan in plans.items():
        attr = weight_attr(modules[name])
        t, m = _layer_tensors(getattr(modules[name], attr).detach().cpu(), plan)
        layers_meta[name] = m | {"tensor": attr}
        for k, v in t.items():
            tensors[f"{name}.{attr}::{k}"] = v.contiguous()
    for key, value in model.state_dict().items():
        if key not in planned:  # a copy: a tied tensor appears under each of its names, and safetensors refuses aliases
            tensors[key] = value.detach().cpu().clone().contiguous()
    return tensors, layers_meta


def packed_size(model: nn.Module, plans: Mapping[str, WeightPlan]) -> int:
    """Bytes of the tensors :func:`export_mixed` writes (the file adds only its JSON header)."""
    tensors, _ = _payload(model, plans)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export_mixed(model: nn.Module, plans: Mapping[str, WeightPlan], path: str | os.PathLike[str]) -> int:
    """Write the packed model (atomic). Returns the file size in bytes."""
    tensors, layers_meta = _payload(model, plans)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    meta = {"format": _FORMAT, "layers": json.dumps(layers_meta), "original_shapes": json.dumps(shapes)}
    _atomic_save(tensors, meta, Path(path))
    return os.path.getsize(path)


def load_mixed(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load a packed file into a fresh ``model`` of the same architecture (weights dequantized)."""
    stored, meta = read_tagged(path, _FORMAT, "mixed-precision file", _OLD_FORMATS)
    layers = json.loads(meta["layers"])
    state = {k: v for k, v in stored.items() if "::" not in k}
    for layer, m in layers.items():
        name = f"{layer}.{m.get('tensor', 'weight')}"  # files written before attention layers: always `weight`
        shape = m["shape"]
        n = int(np.prod(shape))
        keep = (
            np.unpackbits(stored[f"{name}::keep"].numpy())[:n].astype(bool) if m["has_keep"] else np.ones(n, dtype=bool)
        )
        k = int(keep.sum())
        high_kept = (
            np.unpackbits(stored[f"{name}::high"].numpy())[:k].astype(bool)
            if m["mixed"]
            else np.full(k, m["n_codes_high"] == k)
        )
        scales = stored[f"{name}::scales"].double().numpy()
        values = np.zeros(n, dtype=np.float64)
        kept_idx = np.nonzero(keep)[0]
        for key, sel, bits, scale in (
            ("codes_high", high_kept, m["high_bits"], scales[0]),
            ("codes_low", ~high_kept, m["low_bits"], scales[1]),
        ):
            count = m[f"n_{key}"]
            if count:
                bitstream = np.unpackbits(stored[f"{name}::{key}"].numpy())[: count * bits]
                codes = unpack_codes(bitstream, np.array([bits]), count)[0]
                values[kept_idx[sel]] = codes * scale
        state[name] = torch.from_numpy(values).reshape(shape).float()
    shapes = json.loads(meta["original_shapes"]) if "original_shapes" in meta else None
    load_into(model, state, path, shapes)
    return model
