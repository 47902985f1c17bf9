"""Prunable units (structured neurons), channel masks and physical removal of a channel plan.

A *unit* is one torch-pruning dependency group rooted at a Conv/Linear layer: the output channels of every coupled
producer (residual partners, following batch norms, depthwise convolutions) together with the input channels of
every consumer — or the heads of an ``nn.MultiheadAttention`` (a head's query/key/value rows and its ``out_proj``
input columns; masked inside the attention, removed as in :mod:`lightning_xai.pruning.heads`). Channel ``c`` of a
unit is one *neuron* in the sense of C-SWAP: cutting its outgoing connections means zeroing channel ``c`` at the
input of every consumer, which is exactly what physically removing it does to
the rest of the network. :class:`ChannelMasker` performs such cuts with forward pre-hooks (only inside a context
manager); :func:`apply_plan` performs them physically and checks that both agree.

A plan (``{unit name: removed channels}``) is plain data: saved next to a safetensors state dict it lets a fresh
instance of the model class be shrunk and loaded without pickling anything (:func:`save_pruned`,
:func:`load_pruned`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_xai._loading import load_into
from lightning_xai.pruning.heads import attention_of, head_gate, head_removal_problem, head_rows
from lightning_xai.pruning.surgery import (
    ChannelCut,
    _compare,
    _Edit,
    _eval_mode,
    _get,
    _group_cuts,
    _is_depthwise,
    _normalise_inputs,
    _outputs,
    _rollback,
    _tp_inputs,
    _tp_outputs,
    apply_cuts,
    effective_state_dict,
    execution_order,
    original_shapes,
    pruning_group,
)
from lightning_xai.quantization.batched import per_layer_quantization
from lightning_xai.quantization.export import _atomic_save, read_tagged
from lightning_xai.quantization.install import BN_TYPES

__all__ = [
    "PrunableUnit",
    "find_units",
    "ChannelMasker",
    "count_parameters",
    "apply_plan",
    "Plan",
    "save_pruned",
    "load_pruned",
]

Plan = dict[str, list[int]]  # unit name -> removed channels
_FORMAT = "lightning_xai.pruned/2"  # /2: plain keys, original shapes and a checksum; /1 files are still read
_OLD_FORMATS = ("lightning_xai.pruned/1",)


@dataclass
class PrunableUnit:
    """One dependency group: ``size`` channels that are removed together across ``producers`` and ``consumers``."""

    index: int
    name: str  # the root layer's qualified name
    size: int
    position: int  # execution order of the earliest consumer (higher = closer to the output)
    producers: list[str]
    consumers: list[str]
    channel_cuts: list[list[ChannelCut]] = field(repr=False)  # per channel
    magnitude: Tensor = field(repr=False)  # per channel: mean |w| over the producers' output rows
    group_importance: Tensor = field(repr=False)  # per channel: torch-pruning's group L2 magnitude (normalised)
    kind: str = "channels"  # "channels" (a dependency group) or "heads" (an nn.MultiheadAttention's heads)

    def consumer_inputs(self, channel: int) -> dict[str, tuple[int, ...]]:
        """Consumer module name -> input indices carrying ``channel`` (several for flatten → Linear)."""
        return {cut.name: cut.idxs for cut in self.channel_cuts[channel] if cut.kind == "in"}


_BN = BN_TYPES


def names_to(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` ("" is the model itself)."""
    return model.get_submodule(name) if name else model


_IMPORTANCE = tp.importance.GroupMagnitudeImportance(p=2)  # DepGraph's default criterion (used for OMP)


def find_units(
    model: nn.Module, example_inputs: Any, ignore: Sequence[str] = (), importance: Any = None
) -> tuple[list[PrunableUnit], dict[str, str]]:
    """Discover the prunable units of ``model`` (torch-pruning dependency graph on ``example_inputs``).

    Returns the units sorted from the output towards the input (descending ``position``) and the refused roots with
    the reason (model outputs, grouped convolutions, modules that cannot be sliced, or listed in ``ignore``).
    ``importance``: a torch-pruning importance (``tp.importance.LAMPImportance()``, ``TaylorImportance()`` after a
    backward, …) scored on every unit's dependency group into ``group_importance``; default DepGraph's group L2
    magnitude. Scores of one criterion are comparable across units, so one global ranking prunes like the library.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> units, refused = find_units(net, torch.randn(2, 4))
        >>> [(u.name, u.size, u.consumers) for u in units]
        [('2', 3, ['4']), ('0', 6, ['2'])]
    """
    args, kwargs = _normalise_inputs(example_inputs)
    names = {m: n for n, m in model.named_modules()}
    units: list[PrunableUnit] = []
    refused: dict[str, str] = {}
    with _eval_mode(model):
        order = execution_order(model, (args, kwargs))
        with torch.enable_grad(), per_layer_quantization():  # tracing reads the autograd graph
            DG = tp.DependencyGraph().build_dependency(
                model, example_inputs=_tp_inputs(args, kwargs), output_transform=_tp_outputs, verbose=False
            )
        ignored = [m for n, m in model.named_modules() if n in set(ignore)]
        for root, group, reason in _all_groups(DG, ignored):
            root_name = names[root]
            if reason is not None:
                refused[root_name] = reason
                continue
            if isinstance(root, nn.modules.conv._ConvNd) and root.groups != 1 and not _is_depthwise(root):
                refused[root_name] = "grouped convolution"
                continue
            cuts, reason = _group_cuts(group, DG, names, None)
            if reason is not None:
                refused[root_name] = reason
                continue
            size = len(group.items[0].idxs)
            per_channel: list[dict[tuple[str, str], list[int]]] = [defaultdict(list) for _ in range(size)]
            for item in group.items:
                dep = item.dep
                module = dep.target.module
                if dep.target.type not in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.DEPTHWISE_CONV, tp.ops.OPTYPE.LINEAR) and (
                    dep.target.type != tp.ops.OPTYPE.BN
                ):
                    continue
                name = names[module]
                kind = "out" if (DG.is_out_channel_pruning_fn(dep.handler) or _is_depthwise(module)) else "in"
                for idx, ridx in zip(item.idxs, item.root_idxs):
                    per_channel[int(ridx)][(name, kind)].append(int(idx))
            channel_cuts = [
                [ChannelCut(n, k, tuple(sorted(set(v)))) for (n, k), v in sorted(chan.items())] for chan in per_channel
            ]
            producers = sorted(
                {c.name for c in cuts if c.kind == "out" and not isinstance(names_to(model, c.name), _BN)}
            )
            consumers = sorted({c.name for c in cuts if c.kind == "in"}, key=lambda n: order.get(n, 1 << 30))
            device = _get(root, "weight").device  # type: ignore[union-attr]
            magnitude = torch.zeros(size, dtype=torch.float64, device=device)
            counts = torch.zeros(size, dtype=torch.float64, device=device)
            for ch, chan_cuts in enumerate(channel_cuts):
                for cut in chan_cuts:
                    module = names_to(model, cut.name)
                    if cut.kind != "out" or isinstance(module, _BN):
                        continue
                    w = _get(module, "weight")
                    assert w is not None
                    rows = w.detach()[list(cut.idxs)].double().abs()
                    magnitude[ch] += rows.sum()
                    counts[ch] += rows.numel()
            units.append(
                PrunableUnit(
                    index=-1,
                    name=root_name,
                    size=size,
                    position=min(order.get(n, 1 << 30) for n in consumers),
                    producers=producers,
                    consumers=consumers,
                    channel_cuts=channel_cuts,
                    magnitude=(magnitude / counts.clamp_min(1)).float().cpu(),  # ordering data: host
                    group_importance=(importance or _IMPORTANCE)(group).detach().float().cpu(),
                )
            )
        del DG
        units += _head_units(model, order, set(ignore), refused)
    units.sort(key=lambda u: (-u.position, u.name))
    for i, unit in enumerate(units):
        unit.index = i
    return units, refused


def _all_groups(DG: tp.DependencyGraph, ignored: Sequence[nn.Module]) -> Iterator[tuple[nn.Module, Any, str | None]]:
    """``DG.get_all_groups`` for Conv/Linear roots, one root at a time through :func:`pruning_group`, so that a root
    whose traversal does not terminate is refused with its reason while the others go on (torch-pruning's generator
    cannot resume after a failure). Yields ``(root, group, None)`` or ``(root, None, reason)``."""
    visited: set[nn.Module] = set()
    skip = set(ignored) | set(DG.IGNORED_LAYERS_IN_TRACING)
    for module in list(DG.module2node):
        if module in skip or module in visited or not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        pruner = DG.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        group, reason = pruning_group(DG, module, pruner.prune_out_channels, range(pruner.get_out_channels(module)))
        if group is None:
            yield module, None, reason
            continue
        prunable = True
        for dep, _ in group:
            if DG.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
                prunable = prunable and dep.target.module not in skip
        if prunable:
            yield module, group, None


def _head_units(
    model: nn.Module, order: Mapping[str, int], ignore: set[str], refused: dict[str, str]
) -> list[PrunableUnit]:
    """One unit per ``nn.MultiheadAttention`` called in the forward: its channels are whole heads (query/key/value
    rows and ``out_proj`` input columns). Importance as torch-pruning's default: the L2 norm of each head's weights,
    divided by the mean over the unit's heads."""
    units = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention) or name not in order or name in ignore:
            continue
        problem = head_removal_problem(module)
        if problem is not None:
            refused[name] = problem
            continue
        heads, hd = module.num_heads, module.head_dim
        if heads == 0:
            continue
        out_proj = f"{name}.out_proj" if name else "out_proj"
        rows = [head_rows(module, [h]) for h in range(heads)]
        cols = [list(range(h * hd, (h + 1) * hd)) for h in range(heads)]
        w = _get(module, "in_proj_weight").detach().double()  # type: ignore[union-attr]
        wo = _get(module.out_proj, "weight").detach().double()  # type: ignore[union-attr]
        magnitude = torch.stack([w[r].abs().mean() for r in rows])
        l2 = torch.stack([(w[r].pow(2).sum() + wo[:, c].pow(2).sum()).sqrt() for r, c in zip(rows, cols)])
        units.append(
            PrunableUnit(
                index=-1,
                name=name,
                size=heads,
                position=order[name],
                producers=[name],
                consumers=[out_proj],
                channel_cuts=[
                    [ChannelCut(name, "out", tuple(r)), ChannelCut(out_proj, "in", tuple(c))]
                    for r, c in zip(rows, cols)
                ],
                magnitude=magnitude.float().cpu(),
                group_importance=(l2 / l2.mean().clamp_min(1e-12)).float().cpu(),
                kind="heads",
            )
        )
    return units


# ----------------------------------------------------------------------------------------------------------------
# Masks


class ChannelMasker:
    """Zero chosen channels at the inputs of consumer modules (forward pre-hooks, removed on exit).

    ``removed`` holds the persistent cuts ({unit index: set of channels}); :meth:`trial` sets per-chunk extra cuts
    for a batch made of ``K`` stacked copies of the analysis samples, so ``K`` interventions run in one forward.
    Channel dimension: 1 for convolutions, last for Linear layers.
    """

    def __init__(self, model: nn.Module, units: Sequence[PrunableUnit]) -> None:
        self.model = model
        self.units = list(units)
        self.removed: dict[int, set[int]] = defaultdict(set)
        self._trial: list[list[tuple[int, int]]] | None = None  # per chunk: (unit, channel) pairs
        self._masks: dict[str, Tensor | None] = {}
        self._idx_cache: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._trial_fills: dict[str, tuple[Tensor, Tensor] | None] = {}  # per consumer, for the current trial
        self._consumers = sorted({n for u in self.units for n in u.consumers})
        # index tensors are built once, on the device of the model's parameters (not moved per forward)
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))

    # -- state
    def remove(self, unit: int, channels: Sequence[int]) -> None:
        self.removed[unit].update(int(c) for c in channels)
        self._masks.clear()

    def restore(self, unit: int, channels: Sequence[int]) -> None:
        self.removed[unit].difference_update(int(c) for c in channels)
        self._masks.clear()

    def clear(self) -> None:
        self.removed.clear()
        self._masks.clear()

    def plan(self) -> Plan:
        return {self.units[u].name: sorted(chs) for u, chs in sorted(self.removed.items()) if chs}

    @contextlib.contextmanager
    def trial(self, chunks: Sequence[Sequence[tuple[int, int]]]) -> Iterator[None]:
        """Inside: the input batch is ``len(chunks)`` stacked copies; chunk ``k`` additionally cuts ``chunks[k]``."""
        self._trial = [list(c) for c in chunks]
        self._trial_fills.clear()
        try:
            yield
        finally:
            self._trial = None
            self._trial_fills.clear()

    # -- hooks
    def _inputs(self, unit: int, channel: int, name: str) -> Tensor | None:
        key = (unit, channel)
        if key not in self._idx_cache:
            self._idx_cache[key] = {
                n: torch.tensor(idxs, dtype=torch.long, device=self._device)
                for n, idxs in self.units[unit].consumer_inputs(channel).items()
            }
        return self._idx_cache[key].get(name)

    def _fills(self, name: str) -> tuple[Tensor, Tensor] | None:
        """The current trial's cuts at consumer ``name`` as one (chunk, channel) index pair, built once per trial: a
        chain of ``K`` cumulative cuts has ``K(K+1)/2`` pairs, and one ``index_put_`` beats that many small fills."""
        if name not in self._trial_fills:
            assert self._trial is not None
            rows: list[int] = []
            idx: list[int] = []
            for i, pairs in enumerate(self._trial):
                for u, ch in pairs:
                    found = self.units[u].consumer_inputs(ch).get(name, ())
                    rows += [i] * len(found)
                    idx += list(found)
            self._trial_fills[name] = (
                (torch.tensor(rows, device=self._device), torch.tensor(idx, device=self._device)) if rows else None
            )
        return self._trial_fills[name]

    def _persistent(self, name: str) -> Tensor | None:
        if name not in self._masks:
            parts = [self._inputs(u, ch, name) for u, chs in self.removed.items() for ch in chs]
            parts = [p for p in parts if p is not None]
            self._masks[name] = torch.cat(parts) if parts else None
        return self._masks[name]

    def _hook(self, name: str, channel_dim: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            dim = channel_dim if channel_dim >= 0 else x.dim() + channel_dim
            removed = self._persistent(name)
            fills = self._fills(name) if self._trial is not None else None
            if removed is None and fills is None:
                return None
            out = x.clone()
            if removed is not None:
                out.index_fill_(dim, removed.to(x.device), 0.0)
            if fills is not None:
                assert self._trial is not None
                chunks = out.view(len(self._trial), x.shape[0] // len(self._trial), *x.shape[1:])
                rows, idx = fills
                chunks.movedim(dim + 1, 1)[rows.to(x.device), idx.to(x.device)] = 0.0  # a view: writes into out
            return (out,) + tuple(args[1:])

        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator[ChannelMasker]:
        handles = []
        with contextlib.ExitStack() as gates:
            try:
                for name in self._consumers:
                    module = names_to(self.model, name)
                    attention = attention_of(self.model, name)
                    if attention is not None:  # out_proj is called functionally: mask the heads inside
                        gates.enter_context(head_gate(names_to(self.model, attention), self._hook(name, -1)))
                        continue
                    dim = -1 if isinstance(module, nn.Linear) else 1
                    handles.append(module.register_forward_pre_hook(self._hook(name, dim)))
                yield self
            finally:
                for h in handles:
                    h.remove()


# ----------------------------------------------------------------------------------------------------------------
# Parameter counting and physical removal


def _plan_cuts(units: Sequence[PrunableUnit], plan: Mapping[str, Sequence[int]]) -> tuple[list[ChannelCut], str | None]:
    by_name = {u.name: u for u in units}
    cuts: list[ChannelCut] = []
    for name, channels in plan.items():
        unit = by_name.get(name)
        if unit is None:
            return [], f"unknown unit {name!r}; known: {sorted(by_name)[:10]}"
        bad = [c for c in channels if not 0 <= int(c) < unit.size]
        if bad:
            return [], f"unit {name!r} has {unit.size} channels, got indices {bad[:5]}"
        for c in channels:
            cuts.extend(unit.channel_cuts[int(c)])
    return cuts, None


def count_parameters(model: nn.Module, units: Sequence[PrunableUnit], plan: Mapping[str, Sequence[int]]) -> int:
    """Number of parameters ``model`` would have after physically removing ``plan`` (no model change).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> units, _ = find_units(net, torch.randn(2, 4))
        >>> count_parameters(net, units, {"0": [0, 1]})  # 4*4+4 + 2*4+2
        30
    """
    cuts, reason = _plan_cuts(units, plan)
    if reason is not None:
        raise ValueError(f"`plan` is invalid: {reason}")
    out_cut: dict[str, set[int]] = defaultdict(set)
    in_cut: dict[str, set[int]] = defaultdict(set)
    for cut in cuts:
        (out_cut if cut.kind == "out" else in_cut)[cut.name].update(cut.idxs)
    total = 0
    modules = dict(model.named_modules())
    for name, module in modules.items():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        # parameters of a parametrization (the quantized weight's "original", a quantizer's b/e) belong to the layer
        owner_name = name.split(".parametrizations.")[0] if ".parametrizations." in f"{name}." else name
        owner_name = owner_name[: -len(".parametrizations")] if owner_name.endswith(".parametrizations") else owner_name
        owner = modules.get(owner_name, module)
        if owner_name not in out_cut and owner_name not in in_cut:
            total += sum(p.numel() for p in own.values())
            continue
        layer_weight = _get(owner, "weight") if isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) else None
        for pname, p in own.items():
            shape = list(p.shape)
            is_weight = layer_weight is not None and (p is layer_weight or (pname in ("weight", "original")))
            if is_weight and p.dim() >= 2:
                shape[0] -= len(out_cut.get(owner_name, ()))
                if not _is_depthwise(owner):
                    shape[1] -= len(in_cut.get(owner_name, ()))
            elif shape:  # biases, batch-norm affine parameters, per-channel quantizer b/e: along the outputs
                shape[0] -= len(out_cut.get(owner_name, ()))
            n = 1
            for d in shape:
                n *= max(d, 0)
            total += n
    return total


def _keep_one(units: Sequence[PrunableUnit], plan: Mapping[str, Sequence[int]]) -> tuple[Plan, dict[str, int]]:
    """Shapes must stay valid: of a unit losing every channel, keep the last one (it is zeroed at its consumers)."""
    by_name = {u.name: u for u in units}
    physical: Plan = {}
    zeroed: dict[str, int] = {}
    for name, channels in plan.items():
        chs = sorted(set(int(c) for c in channels))
        # an attention may lose every head (it then outputs out_proj's bias)
        if len(chs) >= by_name[name].size and by_name[name].kind != "heads":
            zeroed[name] = chs[-1]
            chs = chs[:-1]
        if chs:
            physical[name] = chs
    return physical, zeroed


def apply_plan(
    model: nn.Module,
    units: Sequence[PrunableUnit],
    plan: Mapping[str, Sequence[int]],
    example_inputs: Any,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> int:
    """Physically remove the channels of ``plan`` from ``model`` (in place). Returns the new parameter count.

    The outputs on ``example_inputs`` must equal those of the masked model (same cuts done with hooks); on any
    mismatch or exception ``model`` is restored exactly and the error re-raised. A unit losing every channel keeps
    one whose consumer weights are zeroed, so the function stays the same.
    """
    cuts, reason = _plan_cuts(units, plan)
    if reason is not None:
        raise ValueError(f"`plan` is invalid: {reason}")
    args, kwargs = _normalise_inputs(example_inputs)
    physical, zeroed = _keep_one(units, plan)
    by_name = {u.name: u for u in units}
    with _eval_mode(model):
        masker = ChannelMasker(model, units)
        for name, chs in plan.items():
            masker.remove(by_name[name].index, chs)
        with masker.active():
            reference = _outputs(model, args, kwargs)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        edits: list[_Edit] = []
        zero_edits: list[tuple[Tensor, tuple, Tensor]] = []
        try:
            with torch.no_grad():
                for name, ch in zeroed.items():  # zero the kept channel's consumer weights before slicing
                    for cname, idxs in by_name[name].consumer_inputs(ch).items():
                        w = _get(names_to(model, cname), "weight")
                        assert w is not None
                        zero_edits.append((w, tuple(idxs), w[:, list(idxs)].clone()))
                        w[:, list(idxs)] = 0.0
            physical_cuts, _ = _plan_cuts(units, physical)
            apply_cuts(model, physical_cuts, (), edits)
            diff = _compare(reference, _outputs(model, args, kwargs), rtol, atol)
            if diff is None:
                raise RuntimeError(
                    "physical removal changed the outputs compared with the masked model; the model was restored"
                )
        except BaseException:
            _rollback(model, edits, (), [])
            with torch.no_grad():
                for w, idxs, old in reversed(zero_edits):
                    w[:, list(idxs)] = old
            model.load_state_dict(saved)
            raise
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading without pickle


def save_pruned(model: nn.Module, path: str | os.PathLike, plan: Mapping[str, Sequence[int]] | None = None) -> None:
    """Save a (pruned) model as safetensors: its plain state dict (quantized weights as their values, plain keys),
    the plan and the shapes before pruning in the metadata, and a checksum; atomic write."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in effective_state_dict(model).items()}
    meta = {
        "format": _FORMAT,
        "plan": json.dumps({k: list(map(int, v)) for k, v in (plan or {}).items()}),
        "original_shapes": json.dumps(original_shapes(model)),
    }
    _atomic_save(tensors, meta, Path(path))


def load_pruned(path: str | os.PathLike, model: nn.Module) -> tuple[nn.Module, Plan]:
    """Shrink a fresh ``model`` (same class, full size; the LightningModule or its inner ``nn.Module``) to the saved
    shapes and load the weights. Returns ``(model, plan)``. No pickle is involved; a foreign, truncated or corrupted
    file, or a model of another architecture, raises ``ValueError``."""
    state, meta = read_tagged(path, _FORMAT, "pruned model", _OLD_FORMATS)
    shapes = json.loads(meta["original_shapes"]) if "original_shapes" in meta else None
    load_into(model, state, path, shapes)
    return model, {k: list(v) for k, v in json.loads(meta.get("plan", "{}")).items()}
