"""C-SWAP (algorithm 1), C-BP (algorithm 4), one-shot magnitude and random pruning orders, pruning curves and SAUCE.

Every method returns a :class:`PruningOrder`: all prunable neurons (unit, channel) in the order they would be
removed, so one curve can be drawn per method and any target ratio is a prefix of the order.

* **C-SWAP** walks the units from the output towards the input; inside a unit, neurons in ascending weight
  magnitude. Each neuron is cut (its outgoing connections, i.e. its channel at every consumer's input) on the network
  *as pruned so far*, ``ξ`` and the per-class paired t-tests are computed, and a neuron that is not critical
  (``∨π ∧ ξ ≤ 0`` fails) is removed at once. The order is: non-critical neurons in the order they were removed, then
  the critical ones by ``ξ`` from the closest to zero to the most negative.
* **C-BP** (algorithm 4) analyses every neuron on the intact network, cutting its connections only towards the
  next layer's *critical* neurons, and orders detrimental (by ``ξ`` descending), neutral (by ``|ξ|`` ascending),
  critical (by ``ξ`` descending); ``cut="all"`` cuts every outgoing connection instead (like C-SWAP, without the
  progressive removal).
* **OMP**: one global ranking by DepGraph's group L2 magnitude (or mean ``|w|``). **Random**: a seeded permutation.

Two engines compute the same scores. ``mode="reference"`` is the slow, obviously-correct one: per neuron, hooks
zero the channel and the whole model runs on the analysis samples. ``mode="fast"`` traces the model with torch.fx;
while a unit is analysed nothing upstream of its consumers changes, so those values are cached once and only the
suffix runs; the consumers' outputs are updated by subtracting the cut channel's contribution (exact for Conv/Linear
layers, which are linear in their input) instead of recomputing them; several interventions share one batched
forward; neurons whose channel is zero on every analysis sample need no forward at all. C-SWAP's decisions are
sequential (a removal changes the network), so batched interventions are speculative: while neurons are mostly
kept, a batch cuts each neuron alone (valid up to the first removal); while they are mostly removed, it is a chain of
cumulative cuts (valid up to the first critical neuron); rows past the first broken bet are discarded and recomputed.
On an untrained network nearly every neuron is removed, and the chains turn one forward per neuron into one per
batch. Both engines
therefore take the same decisions; the only numerical difference is float32 rounding, which
:func:`classify_neurons` absorbs with its ``rtol``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai._datasets import dataset_inputs, dataset_labels
from lightning_xai._fx import symbolic_trace
from lightning_xai._validation import validate_number
from lightning_xai.attribution.causal import (
    CATEGORY_NAMES,
    CRITICAL,
    DETRIMENTAL,
    NEUTRAL,
    classify_neurons,
    true_class_probability,
)
from lightning_xai.evaluation import accuracy, class_scores
from lightning_xai.pruning.heads import attention_of
from lightning_xai.pruning.surgery import _eval_mode
from lightning_xai.pruning.units import ChannelMasker, Plan, PrunableUnit, count_parameters, names_to

__all__ = [
    "METHODS",
    "PruningOrder",
    "cswap_order",
    "cbp_order",
    "magnitude_order",
    "random_order",
    "plan_from_order",
    "prefix_for_ratio",
    "PruningCurve",
    "pruning_curve",
    "sauce",
    "class_balanced_samples",
    "category_table",
    "channel_contribution",
]

METHODS = ("cswap", "cbp", "omp", "random")
Neuron = tuple[int, int]  # (unit index, channel)
ScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class PruningOrder:
    """All neurons in removal order, with what the causal analysis found (empty for OMP/random)."""

    method: str
    order: list[Neuron]
    category: dict[int, Tensor] = field(default_factory=dict)  # unit -> (size,) categories
    xi: dict[int, Tensor] = field(default_factory=dict)  # unit -> (size,) ξ
    non_critical: int = 0  # C-SWAP: the first ``non_critical`` neurons of ``order`` were removed as non-critical
    neurons_evaluated: int = 0
    forwards: int = 0
    seconds: float = 0.0

    @property
    def neurons_per_s(self) -> float:
        return self.neurons_evaluated / self.seconds if self.seconds > 0 else float("inf")

    def category_fractions(self) -> dict[str, float]:
        """Fraction of analysed neurons in each category (over all units)."""
        if not self.category:
            return {}
        cats = torch.cat(list(self.category.values()))
        return {name: float((cats == i).double().mean()) for i, name in enumerate(CATEGORY_NAMES)}

    def categories_per_unit(self, units: Sequence[PrunableUnit]) -> dict[str, dict[str, int]]:
        return {
            units[u].name: {name: int((c == i).sum()) for i, name in enumerate(CATEGORY_NAMES)}
            for u, c in sorted(self.category.items())
        }


# ----------------------------------------------------------------------------------------------------------------
# Score engines


def channel_contribution(module: nn.Module, x: Tensor, idxs: Sequence[int]) -> Tensor:
    """The part of a Linear/Conv (groups 1) layer's output that comes from its input channels ``idxs``, without the
    bias — the layer is linear in its input, so cutting those channels subtracts exactly this."""
    w = module.weight  # the effective (possibly quantized) weight
    idx = list(idxs)
    if isinstance(module, nn.Linear):
        return x[..., idx] @ w[:, idx].T
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return conv(x[:, idx], w[:, idx], None, module.stride, module.padding, module.dilation, 1)


class _Engine:
    """σ of the analysis samples for the network under ``masker``'s cuts, plus ``K`` extra single-neuron cuts."""

    def __init__(
        self,
        model: nn.Module,
        units: Sequence[PrunableUnit],
        masker: ChannelMasker,
        inputs: Tensor,
        labels: Tensor,
        score_fn: ScoreFn,
        batch_size: int,
    ) -> None:
        self.model, self.units, self.masker = model, units, masker
        self.inputs, self.labels, self.score_fn, self.batch_size = inputs, labels, score_fn, batch_size
        self.forwards = 0

    @property
    def per_forward(self) -> int:
        """How many interventions one forward evaluates."""
        return 1

    def begin_unit(self, unit: PrunableUnit) -> None:  # noqa: B027 - optional hook
        pass

    def removed(self, unit: PrunableUnit, channel: int) -> None:  # noqa: B027 - optional hook
        pass

    def baseline(self) -> Tensor:
        self.forwards += 1
        outs = []
        with torch.no_grad():
            for start in range(0, self.inputs.shape[0], self.batch_size):
                sl = slice(start, start + self.batch_size)
                outs.append(self.score_fn(self.model(self.inputs[sl]), self.labels[sl]))
        return torch.cat(outs).double()

    def scores(self, unit: PrunableUnit, channels: Sequence[int], sigma: Tensor) -> Tensor:
        """``(len(channels), M)``: σ with each channel of ``unit`` cut in turn (on top of the current cuts);
        ``sigma`` is the current network's σ (used where a cut provably changes nothing)."""
        rows = []
        for c in channels:
            self.masker.remove(unit.index, [c])
            try:
                rows.append(self.baseline())
            finally:
                self.masker.restore(unit.index, [c])
        return torch.stack(rows)

    def chain_scores(self, unit: PrunableUnit, channels: Sequence[int]) -> Tensor:
        """``(len(channels), M)``: row ``k`` is σ with ``channels[: k + 1]`` of ``unit`` cut together (on top of the
        current cuts) — the network C-SWAP would have if it removed each of them in turn."""
        rows = []
        try:
            for c in channels:
                self.masker.remove(unit.index, [c])
                rows.append(self.baseline())
        finally:
            self.masker.restore(unit.index, list(channels))
        return torch.stack(rows)


class _FastEngine(_Engine):
    """Cached prefix, delta updates at the unit's first consumers, batched interventions."""

    def __init__(self, *args: Any, max_elements: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # activation elements per suffix slice: on a CPU small enough to stay in cache; a GPU is launch-bound on
        # these small batches, so it takes 16x more rows per forward (16 MB per fp32 activation)
        self.max_elements = max_elements or (1 << 22 if self.inputs.is_cuda else 1 << 18)
        self.max_batch = self.batch_size
        self.gm = symbolic_trace(self.model)
        self.gm.eval()
        self.interp = torch.fx.Interpreter(self.gm, garbage_collect_values=False)
        self.nodes = list(self.gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        batchy: set[torch.fx.Node] = set()
        for node in self.nodes:
            if node.op == "placeholder" or any(a in batchy for a in node.all_input_nodes):
                batchy.add(node)
        self.batchy = batchy
        self._unit: PrunableUnit | None = None
        self.row_size: dict[torch.fx.Node, int] = {}

    @property
    def per_forward(self) -> int:
        return max(1, self.max_batch // self.inputs.shape[0])

    def _record_sizes(self, node: torch.fx.Node, value: Any) -> None:
        if isinstance(value, Tensor) and value.dim() > 0 and node in self.batchy:
            self.row_size[node] = max(1, value.numel() // max(1, value.shape[0]))

    # -- graph helpers
    def _exec(self, node: torch.fx.Node, env: dict) -> Any:
        args = torch.fx.node.map_arg(node.args, lambda a: env[a])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: env[a])
        return getattr(self.interp, node.op)(node.target, args, kwargs)

    def _run(self, nodes: Sequence[torch.fx.Node], env: dict, keep: set[torch.fx.Node]) -> Any:
        """Execute ``nodes`` in order on ``env``, freeing each value after its last use (unless in ``keep``): holding
        every intermediate makes each new activation land in fresh, page-faulting memory (3× slower here)."""
        last_use: dict[torch.fx.Node, int] = {}
        for i, node in enumerate(nodes):
            for a in node.all_input_nodes:
                last_use[a] = i
        out = None
        for i, node in enumerate(nodes):
            if node.op == "output":
                out = torch.fx.node.map_arg(node.args[0], lambda a: env[a])
            elif node.op == "placeholder":
                pass
            else:
                env[node] = self._exec(node, env)
                if node not in self.row_size:
                    self._record_sizes(node, env[node])
            for a in node.all_input_nodes:
                if last_use.get(a) == i and a not in keep:
                    env.pop(a, None)
        return out

    def _run_full(self, capture: set[torch.fx.Node]) -> tuple[dict, Any]:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        env: dict[torch.fx.Node, Any] = {placeholders[0]: self.inputs}
        out = self._run(self.nodes, env, capture)
        return {n: env[n] for n in capture}, out

    def baseline(self) -> Tensor:
        self.forwards += 1
        with torch.no_grad():
            _, out = self._run_full(set())
        return self.score_fn(out, self.labels).double()

    def begin_unit(self, unit: PrunableUnit) -> None:
        # an attention's out_proj is called functionally: the attention module is the node that consumes the heads
        called = {attention_of(self.model, c) or c for c in unit.consumers}
        consumer_nodes = [n for n in self.nodes if n.op == "call_module" and n.target in called]
        if not consumer_nodes:
            raise RuntimeError(f"unit {unit.name!r}: its consumers {unit.consumers} were not found in the traced graph")
        downstream: set[torch.fx.Node] = set()
        for node in self.nodes:  # topological order
            if node in consumer_nodes or any(a in downstream for a in node.all_input_nodes):
                downstream.add(node)
        roots = [n for n in consumer_nodes if not any(a in downstream for a in n.all_input_nodes)]
        roots = [n for n in roots if self._delta_ok(names_to(self.model, str(n.target)))]
        frontier = {a for n in downstream for a in n.all_input_nodes if a not in downstream}
        captured: dict[torch.fx.Node, Tensor] = {}
        handles = []
        for node in roots:

            def grab(mod: nn.Module, args: tuple, node: torch.fx.Node = node) -> None:
                captured[node] = args[0]

            handles.append(names_to(self.model, str(node.target)).register_forward_pre_hook(grab))
        # the masker's pre-hooks were registered first, so ``grab`` sees the masked input; the outputs come from env
        try:
            with torch.no_grad():
                cache, _ = self._run_full(frontier | set(roots))
        finally:
            for h in handles:
                h.remove()
        self.forwards += 1
        self._unit = unit
        self.suffix = [n for n in self.nodes if n in downstream and n not in roots]
        self.frontier = {n: cache[n] for n in frontier}
        self.roots = {n: (captured[n], cache[n]) for n in roots}  # masked input, output
        # rows per slice: the widest activation of the suffix decides (late, small activations batch more rows)
        widest = max([self.row_size.get(n, 1) for n in self.suffix] + [1])
        # capped: functions traced as leaves (Swin's window attention) hide intermediates far wider than the rows
        # seen here, and an uncapped slice of a late, narrow suffix grew past 18 GB on Swin-T
        self.max_batch = min(max(self.batch_size, self.max_elements // widest), 16 * self.batch_size)

    @staticmethod
    def _delta_ok(module: nn.Module) -> bool:
        if isinstance(module, nn.Linear):
            return True
        return (
            isinstance(module, (nn.Conv1d, nn.Conv2d))
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )

    def _contribution(self, node: torch.fx.Node, x: Tensor, idxs: Sequence[int]) -> Tensor:
        return channel_contribution(names_to(self.model, str(node.target)), x, idxs)

    def _cut(self, node: torch.fx.Node, x: Tensor, y: Tensor, unit: PrunableUnit, channel: int) -> Tensor:
        """Root ``node``'s output ``y`` with ``channel``'s contribution removed (``y`` itself if it has none there)."""
        idx = unit.consumer_inputs(channel).get(str(node.target))
        return y - self._contribution(node, x, idx) if idx else y

    def _zero_effect(self, unit: PrunableUnit, channel: int) -> bool:
        """True when cutting ``channel`` provably changes nothing: it is zero at every consumer input."""
        if len(self.roots) != len(unit.consumers):
            return False
        inputs = unit.consumer_inputs(channel)
        for node, (x, _) in self.roots.items():
            idx = list(inputs.get(str(node.target), ()))
            if idx and bool(
                (x[..., idx] if isinstance(names_to(self.model, str(node.target)), nn.Linear) else x[:, idx]).any()
            ):
                return False
        return True

    def removed(self, unit: PrunableUnit, channel: int) -> None:
        inputs = unit.consumer_inputs(channel)
        with torch.no_grad():
            for node, (x, y) in list(self.roots.items()):
                idx = inputs.get(str(node.target))
                if not idx:
                    continue
                y = y - self._contribution(node, x, idx)
                x = x.clone()
                if isinstance(names_to(self.model, str(node.target)), nn.Linear):
                    x[..., list(idx)] = 0.0
                else:
                    x[:, list(idx)] = 0.0
                self.roots[node] = (x, y)

    def scores(self, unit: PrunableUnit, channels: Sequence[int], sigma: Tensor) -> Tensor:
        assert self._unit is unit, "begin_unit() must be called first"
        per_forward = self.per_forward
        rows: dict[int, Tensor] = {}
        todo = []
        for c in channels:
            if self._zero_effect(unit, c):
                rows[c] = sigma  # exact: the channel is zero wherever it is consumed
            else:
                todo.append(c)
        for start in range(0, len(todo), per_forward):
            chunk = todo[start : start + per_forward]
            out = self._suffix([[c] for c in chunk])
            for c, r in zip(chunk, out):
                rows[c] = r
        return torch.stack([rows[c] for c in channels])

    def chain_scores(self, unit: PrunableUnit, channels: Sequence[int]) -> Tensor:
        assert self._unit is unit, "begin_unit() must be called first"
        rows = []
        per_forward = self.per_forward
        for start in range(0, len(channels), per_forward):
            stop = min(len(channels), start + per_forward)
            rows.append(self._suffix([channels[: k + 1] for k in range(start, stop)], chain=True))
        return torch.cat(rows)

    def _suffix(self, chunks: Sequence[Sequence[int]], chain: bool = False) -> Tensor:
        """σ for ``len(chunks)`` interventions (each a list of channels of the current unit), batched together and
        run over slices of the samples so that at most ``max_batch`` rows (set per unit from the widest activation of
        the suffix) go through it at once. ``chain``: each chunk extends the one before by one channel (cumulative
        cuts), so the root updates are running sums and each channel's contribution is computed once."""
        unit = self._unit
        assert unit is not None
        k = len(chunks)
        m = self.inputs.shape[0]
        step = max(1, self.max_batch // k)
        pieces = []
        with torch.no_grad(), self.masker.trial([[(unit.index, c) for c in chans] for chans in chunks]):
            for start in range(0, m, step):
                sl = slice(start, min(m, start + step))
                env: dict[torch.fx.Node, Any] = {}
                for node, value in self.frontier.items():
                    if node in self.batchy and isinstance(value, Tensor) and value.dim() > 0:
                        value = value[sl]
                        value = value.repeat(k, *([1] * (value.dim() - 1))) if k > 1 else value
                    env[node] = value
                for node, (x, y) in self.roots.items():
                    outs = []
                    if chain:
                        out = y[sl]
                        for c in chunks[0][:-1]:  # the chain's common start
                            out = self._cut(node, x[sl], out, unit, c)
                        for chans in chunks:
                            out = self._cut(node, x[sl], out, unit, chans[-1])
                            outs.append(out)
                    else:
                        for chans in chunks:
                            out = y[sl]
                            for c in chans:
                                out = self._cut(node, x[sl], out, unit, c)
                            outs.append(out)
                    env[node] = torch.cat(outs) if k > 1 else outs[0]
                result = self._run(self.suffix, env, set())
                labels = self.labels[sl].repeat(k)
                pieces.append(self.score_fn(result, labels).double().reshape(k, -1))
        self.forwards += 1
        return torch.cat(pieces, dim=1)


def _make_engine(
    mode: str,
    model: nn.Module,
    units: Sequence[PrunableUnit],
    masker: ChannelMasker,
    inputs: Tensor,
    labels: Tensor,
    score_fn: ScoreFn,
    batch_size: int,
) -> _Engine:
    user_fn = score_fn

    def score_fn(output: Any, labels: Tensor) -> Tensor:  # models may return a dict / tuple / ModelOutput
        return user_fn(class_scores(output), labels)

    if mode == "reference":
        return _Engine(model, units, masker, inputs, labels, score_fn, batch_size)
    if mode != "fast":
        raise ValueError(f"`mode` must be 'fast' or 'reference', got {mode!r}")
    try:
        return _FastEngine(model, units, masker, inputs, labels, score_fn, batch_size)
    except Exception as err:  # noqa: BLE001 - tracing arbitrary models fails in many ways; fall back, same decisions
        import warnings

        warnings.warn(
            f"C-SWAP fast mode could not trace the model ({type(err).__name__}: {err}); using the reference engine",
            stacklevel=3,
        )
        return _Engine(model, units, masker, inputs, labels, score_fn, batch_size)


def class_balanced_samples(dataset: Any, per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Up to ``per_class`` samples of every class of a map-style ``dataset`` of ``(x, y)`` pairs (seeded choice).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None], torch.tensor([0, 1] * 5))
        >>> x, y = class_balanced_samples(ds, 2)
        >>> y.tolist()
        [0, 0, 1, 1]
    """
    validate_number("per_class", per_class, low=2, integer=True)
    labels = dataset_labels(dataset)  # chosen by index on the CPU; only the chosen inputs are read
    gen = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for k in sorted(set(labels.tolist())):
        idx = torch.nonzero(labels == k).flatten()
        chosen += idx[torch.randperm(idx.numel(), generator=gen)[:per_class]].sort().values.tolist()
    return dataset_inputs(dataset, chosen), labels[chosen]


def _check_inputs(units: Sequence[PrunableUnit], inputs: Tensor, labels: Tensor, alpha: float) -> None:
    validate_number("alpha", alpha, low=0.0, low_open=True, high=1.0)
    if not units:
        raise ValueError("`units` is empty: the model has no prunable Conv/Linear channels (see find_units' reasons)")
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"`inputs` has {inputs.shape[0]} samples but `labels` has {labels.shape[0]}")
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        bad = int((~torch.isfinite(inputs)).flatten(1).any(1).sum())
        raise ValueError(f"`inputs` contain NaN or Inf ({bad} of {inputs.shape[0]} samples): clean the analysis data")


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="neuron", leave=False)


# ----------------------------------------------------------------------------------------------------------------
# Algorithms


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """TensorFloat-32 off for cuDNN convolutions and CUDA matmuls inside (restored after). C-SWAP's verdicts compare
    small score differences with a sign test: under cuDNN's default TF32 convolutions the fast engine (masks batched
    into one forward) and the reference engine (one forward per mask) round differently, and on an H200 244 of a
    ResNet-18's 2,880 neurons changed category between them; in full fp32 the two agree exactly (BENCHMARKS.md,
    gpu_check). No effect on the CPU."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cswap_order(
    model: nn.Module,
    units: Sequence[PrunableUnit],
    inputs: Tensor,
    labels: Tensor,
    alpha: float = 0.05,
    score_fn: ScoreFn = true_class_probability,
    mode: str = "fast",
    batch_size: int = 256,
    rtol: float = 1e-5,
    progress: bool = False,
) -> PruningOrder:
    """Algorithm 1 of C-SWAP. The model is left unchanged (cuts are hooks inside this call); the analysis runs in
    full fp32 (no TF32, see :func:`full_fp32`).

    ``inputs``/``labels`` are the analysis samples (e.g. ``M`` per class, see :func:`class_balanced_samples`).
    """
    _check_inputs(units, inputs, labels, alpha)
    start = time.perf_counter()
    result = PruningOrder("cswap", [])
    critical: list[tuple[float, Neuron]] = []
    bar = _progress(sum(u.size for u in units), progress, "C-SWAP")
    with _eval_mode(model), full_fp32():
        masker = ChannelMasker(model, units)
        with masker.active():
            engine = _make_engine(mode, model, units, masker, inputs, labels, score_fn, batch_size)
            sigma = engine.baseline()
            speculate, removal_rate = 4, 1.0
            for unit in units:  # from the output towards the input
                engine.begin_unit(unit)
                cats = torch.full((unit.size,), NEUTRAL, dtype=torch.int64)
                xis = torch.zeros(unit.size, dtype=torch.float64)
                queue = torch.argsort(unit.magnitude, stable=True).tolist()
                while queue:
                    # Speculative batches, two kinds. Independent: each neuron cut alone; valid up to the first
                    # removal (later rows were measured without it). Chain: row k cuts the first k + 1 neurons
                    # together, so neuron k is judged on the network with the ones before it removed; valid up to the
                    # first critical neuron. Rows past that are discarded. The kind bets on the recent removal rate.
                    batch = queue[: min(speculate, engine.per_forward)]
                    chain = removal_rate >= 0.5
                    if chain:
                        stars = engine.chain_scores(unit, batch)
                        before = torch.cat([sigma[None], stars[:-1]])
                    else:
                        stars, before = engine.scores(unit, batch, sigma), sigma
                    verdicts = classify_neurons(before, stars, labels, alpha, rtol)
                    decided = 0
                    for j, c in enumerate(batch):
                        queue.pop(0)
                        decided += 1
                        result.neurons_evaluated += 1
                        if bar is not None:
                            bar.update(1)
                        cat, xi = int(verdicts.category[j]), float(verdicts.xi[j])
                        is_critical = bool(verdicts.significant[j].any()) and xi <= 0
                        cats[c] = CRITICAL if is_critical else cat
                        xis[c] = xi
                        removal_rate = 0.8 * removal_rate + 0.2 * (not is_critical)
                        if is_critical:
                            critical.append((xi, (unit.index, c)))
                            if chain:
                                break
                            continue
                        masker.remove(unit.index, [c])  # not critical: removed at once
                        engine.removed(unit, c)
                        result.order.append((unit.index, c))
                        sigma = stars[j]
                        if not chain:
                            break
                    speculate = min(1 << 12, 2 * speculate) if decided == len(batch) else max(2, 2 * decided)
                result.category[unit.index] = cats
                result.xi[unit.index] = xis
    if bar is not None:
        bar.close()
    result.non_critical = len(result.order)
    critical.sort(key=lambda t: -t[0])  # ξ closest to zero first
    result.order += [n for _, n in critical]
    result.forwards = engine.forwards
    result.seconds = time.perf_counter() - start
    return result


def cbp_order(
    model: nn.Module,
    units: Sequence[PrunableUnit],
    inputs: Tensor,
    labels: Tensor,
    alpha: float = 0.05,
    score_fn: ScoreFn = true_class_probability,
    mode: str = "fast",
    batch_size: int = 256,
    rtol: float = 1e-5,
    progress: bool = False,
    cut: str = "critical_next",
) -> PruningOrder:
    """C-BP (algorithm 4): causal ranking on the intact network, no progressive removal.

    ``cut="critical_next"`` (the algorithm): a neuron's connections are cut only towards the *critical* neurons of
    the next layer (the consumers' output channels found critical before — units are analysed output first; outputs
    of the model count as critical); this runs one forward per neuron. ``cut="all"``: every outgoing connection, like
    C-SWAP (``mode`` then picks the engine).
    """
    if cut not in ("critical_next", "all"):
        raise ValueError(f"`cut` must be 'critical_next' or 'all', got {cut!r}")
    _check_inputs(units, inputs, labels, alpha)
    start = time.perf_counter()
    result = PruningOrder("cbp", [])
    bar = _progress(sum(u.size for u in units), progress, "C-BP")
    owner = _output_owners(units)
    with _eval_mode(model):
        masker = ChannelMasker(model, units)
        with masker.active():
            engine = _make_engine(
                mode if cut == "all" else "reference", model, units, masker, inputs, labels, score_fn, batch_size
            )
            sigma = engine.baseline()
            for unit in units:
                if cut == "all":
                    engine.begin_unit(unit)
                    stars = engine.scores(unit, list(range(unit.size)), sigma)
                else:
                    rows = {m: _critical_rows(model, m, owner, result.category) for m in unit.consumers}
                    stars = torch.stack([_partial_cut_scores(engine, model, unit, c, rows) for c in range(unit.size)])
                verdicts = classify_neurons(sigma, stars, labels, alpha, rtol)
                result.category[unit.index] = verdicts.category
                result.xi[unit.index] = verdicts.xi
                result.neurons_evaluated += unit.size
                if bar is not None:
                    bar.update(unit.size)
    if bar is not None:
        bar.close()
    entries = [
        (u, c, int(result.category[u][c]), float(result.xi[u][c]))
        for u in result.category
        for c in range(units[u].size)
    ]
    det = sorted((e for e in entries if e[2] == DETRIMENTAL), key=lambda e: -e[3])
    neu = sorted((e for e in entries if e[2] == NEUTRAL), key=lambda e: abs(e[3]))
    cri = sorted((e for e in entries if e[2] == CRITICAL), key=lambda e: -e[3])
    result.order = [(u, c) for u, c, _, _ in det + neu + cri]
    result.forwards = engine.forwards
    result.seconds = time.perf_counter() - start
    return result


def _output_owners(units: Sequence[PrunableUnit]) -> dict[str, dict[int, tuple[int, int]]]:
    """Layer name -> {output index: (unit, channel)} for every Conv/Linear output channel that belongs to a unit."""
    owner: dict[str, dict[int, tuple[int, int]]] = {}
    for u in units:
        for c, cuts in enumerate(u.channel_cuts):
            for cut in cuts:
                if cut.kind == "out":
                    for i in cut.idxs:
                        owner.setdefault(cut.name, {})[int(i)] = (u.index, c)
    return owner


def _critical_rows(
    model: nn.Module, name: str, owner: dict[str, dict[int, tuple[int, int]]], category: dict[int, Tensor]
) -> Tensor:
    """Which output channels of layer ``name`` are critical (model outputs and not-yet-analysed ones count as such)."""
    module = names_to(model, name)
    width = module.weight.shape[0]
    rows = torch.ones(width, dtype=torch.bool)
    for i, (u, c) in owner.get(name, {}).items():
        if u in category and i < width:
            rows[i] = bool(category[u][c] == CRITICAL)
    return rows


def _partial_cut_scores(
    engine: _Engine, model: nn.Module, unit: PrunableUnit, channel: int, rows: dict[str, Tensor]
) -> Tensor:
    """σ with ``channel`` cut only towards the critical output rows of each consumer (forward hooks that subtract
    the channel's contribution on those rows; removed afterwards)."""
    handles = []

    def hook_for(name: str, idxs: tuple[int, ...]):
        idx = list(idxs)
        keep_rows = rows[name]

        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            shape = [-1] if isinstance(module, nn.Linear) else [1, -1] + [1] * (out.dim() - 2)
            mask = keep_rows.to(device=out.device, dtype=out.dtype).reshape(shape)
            return out - channel_contribution(module, args[0], idx) * mask

        return hook

    try:
        for name, idxs in unit.consumer_inputs(channel).items():
            if bool(rows[name].any()):
                handles.append(names_to(model, name).register_forward_hook(hook_for(name, idxs)))
        return engine.baseline()
    finally:
        for h in handles:
            h.remove()


def magnitude_order(units: Sequence[PrunableUnit], criterion: str = "group_l2") -> PruningOrder:
    """One-shot magnitude pruning (OMP), one global ranking in ascending magnitude.

    ``criterion``: ``"group_l2"`` (default) is torch-pruning/DepGraph's ``GroupMagnitudeImportance(p=2)`` — the L2
    norm over every coupled parameter of the neuron, normalised by the group mean — the library the paper's baselines
    use; ``"mean_abs"`` is the mean ``|w|`` of the neuron's producer rows.
    """
    if criterion not in ("group_l2", "mean_abs"):
        raise ValueError(f"`criterion` must be 'group_l2' or 'mean_abs', got {criterion!r}")
    score = {u.index: (u.group_importance if criterion == "group_l2" else u.magnitude) for u in units}
    entries = [(float(score[u.index][c]), u.index, c) for u in units for c in range(u.size)]
    entries.sort()
    return PruningOrder("omp", [(u, c) for _, u, c in entries])


def random_order(units: Sequence[PrunableUnit], seed: int = 0) -> PruningOrder:
    """A seeded random permutation of all neurons."""
    neurons = [(u.index, c) for u in units for c in range(u.size)]
    perm = torch.randperm(len(neurons), generator=torch.Generator().manual_seed(seed)).tolist()
    return PruningOrder("random", [neurons[i] for i in perm])


# ----------------------------------------------------------------------------------------------------------------
# Plans, curves, SAUCE


def plan_from_order(units: Sequence[PrunableUnit], order: Sequence[Neuron], k: int) -> Plan:
    """The plan removing the first ``k`` neurons of ``order``."""
    plan: dict[str, list[int]] = {}
    for u, c in order[:k]:
        plan.setdefault(units[u].name, []).append(int(c))
    return {name: sorted(chs) for name, chs in plan.items()}


def prefix_for_ratio(model: nn.Module, units: Sequence[PrunableUnit], order: Sequence[Neuron], ratio: float) -> int:
    """Smallest ``k`` whose plan removes at least ``ratio`` of the model's parameters (``len(order)`` if none does)."""
    validate_number("ratio", ratio, low=0.0, high=1.0)
    total = sum(p.numel() for p in model.parameters())
    lo, hi = 0, len(order)
    if 1 - count_parameters(model, units, plan_from_order(units, order, hi)) / total < ratio:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if 1 - count_parameters(model, units, plan_from_order(units, order, mid)) / total >= ratio:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class PruningCurve:
    method: str
    removed: list[float]  # fraction of all parameters removed
    accuracy: list[float]
    kept_neurons: list[int]

    @property
    def sauce(self) -> float:
        return sauce(self.removed, self.accuracy)


def sauce(removed: Sequence[float], accuracy: Sequence[float]) -> float:
    """Sparsity AUC Estimator: the area under accuracy vs fraction of parameters removed, normalised by the x range
    it covers and reported in percent — the mean accuracy (%) over the prunable range ``[0, x_max]`` (trapezoids).

    Example:
        >>> sauce([0.0, 0.5, 1.0], [1.0, 1.0, 0.0])
        75.0
    """
    if len(removed) != len(accuracy) or len(removed) < 2:
        raise ValueError("`removed` and `accuracy` must have the same length >= 2")
    x = torch.tensor(removed, dtype=torch.float64)
    y = torch.tensor(accuracy, dtype=torch.float64)
    span = float(x[-1] - x[0])
    if span <= 0:
        raise ValueError(f"`removed` must increase, got {list(removed)[:3]}...{list(removed)[-1:]}")
    return 100.0 * float(torch.trapezoid(y, x)) / span


def pruning_curve(
    model: nn.Module,
    units: Sequence[PrunableUnit],
    order: PruningOrder,
    inputs: Tensor,
    labels: Tensor,
    points: int = 21,
    batch_size: int = 1024,
) -> PruningCurve:
    """Accuracy on ``inputs`` (e.g. the validation set) after removing prefixes of ``order``, without fine-tuning, at
    ``points`` evenly spaced fractions of parameters removed between 0 and removing every prunable neuron. Cuts are
    masks (equal to physical removal, see :func:`~lightning_xai.pruning.units.apply_plan`); the model is unchanged.
    """
    validate_number("points", points, low=2, integer=True)
    total = sum(p.numel() for p in model.parameters())
    n = len(order.order)
    x_max = 1 - count_parameters(model, units, plan_from_order(units, order.order, n)) / total
    ks = sorted({prefix_for_ratio(model, units, order.order, x_max * i / (points - 1)) for i in range(points)} | {0, n})
    curve = PruningCurve(order.method, [], [], [])
    by_name = {u.name: u for u in units}
    with _eval_mode(model):
        masker = ChannelMasker(model, units)
        with masker.active():
            for k in ks:
                masker.clear()
                for name, chs in plan_from_order(units, order.order, k).items():
                    masker.remove(by_name[name].index, chs)
                removed = 1 - count_parameters(model, units, masker.plan()) / total
                curve.removed.append(removed)
                curve.accuracy.append(accuracy(model, inputs, labels, batch_size))
                curve.kept_neurons.append(n - k)
    return curve


def category_table(order: PruningOrder, units: Sequence[PrunableUnit]) -> list[tuple[str, int, int, int]]:
    """(unit, critical, neutral, detrimental) counts, from the output towards the input."""
    per = order.categories_per_unit(units)
    return [(name, c["critical"], c["neutral"], c["detrimental"]) for name, c in per.items()]
