"""Layer-wise Relevance Propagation with **weight** relevance (arXiv 2507.05286, eq. ``R_ij = (a_i·w_ij / z_j)·R_j``).

The model is traced with torch.fx and relevance is propagated through the graph from the output back to the input,
one node at a time, so residual additions and concatenations are handled wherever they are (no hooks are put on the
user's modules; batch norms are folded into the preceding layer inside :func:`canonized`, and restored on exit).

Rules (small configurations of one generic linear-layer step, chosen per layer by :class:`Composite`):

* :class:`Epsilon` — ``R_i = Σ_j a_i w_ij / (z_j + ε·sign z_j) · R_j``;
* :class:`ZPlus` — the same with ``w⁺`` only, no bias (``α=1, β=0``);
* :class:`AlphaBeta` — ``α·(positive contributions) − β·(negative contributions)``, ``α − β = 1``;
* :class:`ZBox` — the first-layer rule for inputs bounded by ``[low, high]``.

Every rule also returns the weight relevance ``R_W`` (per weight, summed over samples and positions): the terms
whose sum over ``i`` is the message ``R_j``. Non-parametric nodes: ReLU/dropout/identity/reshape pass relevance
through; other elementwise activations (ReLU6, SiLU, GELU, Hardswish, LeakyReLU, ELU, …) and stochastic depth use
the identity rule; a gating product ``g · x`` (squeeze-excitation, ``x · σ(x)``) gives all relevance to the signal
``x`` and none to the gate ``g`` (the gate is the factor produced by a sigmoid, or the one broadcast over the other;
the rule of Arras et al. 2017 for LSTM gates, used by AttnLRP); a product with a constant passes it through;
max-pooling routes it to the winners, average pooling uses the epsilon rule, additions split it in proportion to the
summands. Grouped and depthwise convolutions use the same layer rules. In-place activations are run out of place
during the analysis (the user's modules get their flags back). Anything else raises one ``ValueError`` that lists
every unsupported node with its type.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai._fx import symbolic_trace
from lightning_xai.evaluation import class_scores

__all__ = [
    "Rule",
    "Epsilon",
    "ZPlus",
    "AlphaBeta",
    "ZBox",
    "Composite",
    "LRPResult",
    "lrp",
    "canonized",
    "weight_relevance",
]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BN = (nn.modules.batchnorm._BatchNorm,)
_PASS_MODULES = (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten, nn.Unflatten) + _BN
_PASS_FUNCTIONS = {
    F.relu,
    torch.relu,
    torch.flatten,
    torch.reshape,
    torch.cat,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
    F.dropout,
    operator.getitem,
}
_PASS_METHODS = {
    "relu",
    "view",
    "reshape",
    "flatten",
    "squeeze",
    "unsqueeze",
    "permute",
    "transpose",
    "contiguous",
    "expand",  # a broadcast constant (ViT's class token): the gradient sums the relevance back onto it
    "to",  # dtype/device moves
    "float",
    "type_as",
}
# Elementwise non-linearities: the identity rule (relevance passes through unchanged), as for every elementwise
# function in Montavon et al. 2019 (LRP overview, §10.2.1) and AttnLRP (Achtibat et al. 2024, Prop. 3.1). ReLU keeps
# its gradient pass (the same on every position that carries relevance; it is what zennit does, tested against it).
_IDENTITY_MODULES = (
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softplus,
    nn.Tanh,
    nn.AlphaDropout,
    nn.Dropout1d,
    nn.Dropout3d,
)
_IDENTITY_FUNCTIONS = {
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardtanh,
    F.softplus,
    torch.tanh,
    F.alpha_dropout,
    F.dropout1d,
    F.dropout2d,
}
_IDENTITY_METHODS = {"tanh"}
# identity in evaluation mode, whatever the library (matched by class/function name: torchvision is optional)
_IDENTITY_NAMES = {"StochasticDepth", "stochastic_depth", "DropPath", "drop_path"}
# gates: the multiplicand of a gating product that gets no relevance (SE blocks' ``scale · x``, ``x · σ(x)``)
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
ATTENTION_RULES = ("cp", "attnlrp")
# shape arithmetic (``n, c, h, w = x.shape``, ``h // p``, ``torch._assert``): values that are never tensors and
# never carry relevance
_SHAPE_FUNCTIONS = {
    getattr,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.floordiv,
    operator.mod,
    torch._assert,
}
_SHAPE_METHODS = {"dim", "size"}
# torchvision's Swin helpers, matched by name (torchvision is optional): window attention (CP-LRP, see
# _window_attention), the relative position bias (a constant built from parameters: no relevance), the patch-merging
# pad (zero padding and strided slices concatenated: relevance routed like the values)
_WINDOW_ATTENTION_NAMES = {"shifted_window_attention"}
_CONSTANT_NAMES = {"_get_relative_position_bias"}
_ROUTING_NAMES = {"_patch_merging_pad"}
_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_MAX_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def _stabilize(z: Tensor, eps: float) -> Tensor:
    return torch.where(z >= 0, z + eps, z - eps)


def _apply(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return conv(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def _message(module, x, weight, bias, s) -> tuple[Tensor, Tensor]:
    """``(Jᵀ s, ∂(z·s)/∂W)`` for ``z = layer(x; weight, bias)`` — both linear in ``s``."""
    x = x.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    with torch.enable_grad():
        z = _apply(module, x, w, None if bias is None else bias.detach())
        gx, gw = torch.autograd.grad(z, (x, w), grad_outputs=s)
    return gx, gw


class Rule:
    """One LRP step through a Linear/Conv layer: ``(R_in, R_W) = rule(module, a, R_out, weight, bias, z)``; ``z`` is
    the layer's output when the caller already has it."""

    def __call__(self, module: nn.Module, a: Tensor, r: Tensor, weight: Tensor, bias: Tensor | None, z=None):
        raise NotImplementedError


@dataclass(frozen=True)
class Epsilon(Rule):
    """``R_ij = a_i w_ij / (z_j + ε·sign z_j) · R_j`` (ε → 0: the basic rule of the paper).

    ``absolute=True`` changes only the *weight* relevance to ``Σ_samples |a_i w_ij / z_j · R_j|`` (how much flows
    through the weight, whatever its sign); the propagated relevance is unchanged.
    """

    eps: float = 1e-6
    absolute: bool = False

    def __call__(self, module, a, r, weight, bias, z=None):
        if z is None:
            with torch.no_grad():
                z = _apply(module, a, weight, bias)
        s = r / _stabilize(z, self.eps)
        gx, gw = _message(module, a, weight, bias, s)
        if self.absolute:
            _, gw_abs = _message(module, a.abs(), weight.abs(), None, s.abs())
            return a * gx, weight.abs() * gw_abs
        return a * gx, weight * gw


@dataclass(frozen=True)
class ZPlus(Rule):
    """``R_ij = a_i w⁺_ij / Σ_i a_i w⁺_ij · R_j`` for non-negative inputs (α=1, β=0); negative weights get none."""

    eps: float = 1e-9

    def __call__(self, module, a, r, weight, bias, z=None):
        wp = weight.clamp(min=0)
        with torch.no_grad():
            z = _apply(module, a, wp, None)
        s = r / _stabilize(z, self.eps)
        gx, gw = _message(module, a, wp, None, s)
        return a * gx, wp * gw


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """``R_ij = (α·(a_i w_ij)⁺ / z⁺_j − β·(a_i w_ij)⁻ / z⁻_j) · R_j`` with ``α − β = 1`` (inputs of any sign)."""

    alpha: float = 2.0
    beta: float = 1.0
    eps: float = 1e-9

    def __post_init__(self) -> None:
        if abs(self.alpha - self.beta - 1.0) > 1e-9:
            raise ValueError(f"AlphaBeta needs `alpha` - `beta` = 1, got alpha={self.alpha}, beta={self.beta}")

    def __call__(self, module, a, r, weight, bias, z=None):
        ap, an = a.clamp(min=0), a.clamp(max=0)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        with torch.no_grad():
            zp = _apply(module, ap, wp, None) + _apply(module, an, wn, None)  # sum of positive contributions
            zn = _apply(module, ap, wn, None) + _apply(module, an, wp, None)  # sum of negative contributions
        sp = r / _stabilize(zp, self.eps)
        sn = r / _stabilize(zn, self.eps)
        gx1, gw1 = _message(module, ap, wp, None, sp)
        gx2, gw2 = _message(module, an, wn, None, sp)
        gx3, gw3 = _message(module, ap, wn, None, sn)
        gx4, gw4 = _message(module, an, wp, None, sn)
        r_in = self.alpha * (ap * gx1 + an * gx2) - self.beta * (ap * gx3 + an * gx4)
        r_w = self.alpha * (wp * gw1 + wn * gw2) - self.beta * (wn * gw3 + wp * gw4)
        return r_in, r_w


@dataclass(frozen=True)
class ZBox(Rule):
    """First-layer rule for inputs in ``[low, high]``: ``z_ij = a_i w_ij − l_i w⁺_ij − h_i w⁻_ij``."""

    low: float | Tensor = -1.0
    high: float | Tensor = 1.0
    eps: float = 1e-9

    def __call__(self, module, a, r, weight, bias, z=None):
        low = torch.as_tensor(self.low, dtype=a.dtype, device=a.device).expand_as(a)
        high = torch.as_tensor(self.high, dtype=a.dtype, device=a.device).expand_as(a)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        with torch.no_grad():
            z = _apply(module, a, weight, None) - _apply(module, low, wp, None) - _apply(module, high, wn, None)
        s = r / _stabilize(z, self.eps)
        gx, gw = _message(module, a, weight, None, s)
        gl, gwl = _message(module, low, wp, None, s)
        gh, gwh = _message(module, high, wn, None, s)
        return a * gx - low * gl - high * gh, weight * gw - wp * gwl - wn * gwh


@dataclass
class Composite:
    """Which rule for which layer: ``by_name`` > ``first`` (the first layer the input reaches) > ``by_type`` >
    ``default``.

    Example:
        >>> c = Composite(first=ZBox(-1.0, 1.0), by_type={nn.Conv2d: ZPlus()})
        >>> c.rule_for("features.0", nn.Conv2d(1, 2, 3), is_first=True)
        ZBox(low=-1.0, high=1.0, eps=1e-09)
    """

    default: Rule = field(default_factory=Epsilon)
    by_type: Mapping[type, Rule] = field(default_factory=dict)
    by_name: Mapping[str, Rule] = field(default_factory=dict)
    first: Rule | None = None
    attention: str = "cp"  # "cp" (CP-LRP) or "attnlrp" for nn.MultiheadAttention, see _attention

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_RULES:
            raise ValueError(f"`attention` must be one of {ATTENTION_RULES}, got {self.attention!r}")

    def rule_for(self, name: str, module: nn.Module, is_first: bool) -> Rule:
        if name in self.by_name:
            return self.by_name[name]
        if is_first and self.first is not None:
            return self.first
        for cls, rule in self.by_type.items():
            if isinstance(module, cls):
                return rule
        return self.default


@dataclass
class LRPResult:
    """Relevance of the input, of every node's output (keyed by module name for module calls, by graph node name
    otherwise), of every Linear/Conv weight (summed over samples), and the relevance put on the output."""

    input: Tensor
    activations: dict[str, Tensor]
    weights: dict[str, Tensor]
    output: Tensor


# ----------------------------------------------------------------------------------------------------------------
# Canonization


def _fold_pairs(gm: torch.fx.GraphModule, modules: Mapping[str, nn.Module]) -> list[tuple[str, str]]:
    """(layer, batch norm) pairs where the batch norm reads only that Linear/Conv layer's output."""
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), _BN):
            continue
        prev = node.args[0] if node.args else None
        if (
            isinstance(prev, torch.fx.Node)
            and prev.op == "call_module"
            and isinstance(modules.get(str(prev.target)), _LAYERS)
            and len(prev.users) == 1
        ):
            pairs.append((str(prev.target), str(node.target)))
        else:
            raise ValueError(
                f"LRP cannot fold batch norm `{node.target}`: it does not directly follow a Linear/Conv layer "
                "whose only user it is"
            )
    return pairs


@contextlib.contextmanager
def canonized(model: nn.Module, gm: torch.fx.GraphModule | None = None) -> Iterator[list[tuple[str, str]]]:
    """Fold every batch norm into the Linear/Conv layer before it (in eval mode the function is unchanged) and make
    the batch norm an identity; everything is restored on exit, also after an exception. Yields the folded pairs.
    ``gm``: the model already traced (it shares the model's modules)."""
    gm = gm if gm is not None else symbolic_trace(model)
    modules = dict(model.named_modules())
    pairs = _fold_pairs(gm, modules)
    saved: list[tuple[nn.Module, dict[str, Tensor | None]]] = []
    try:
        with torch.no_grad():
            for layer_name, bn_name in pairs:
                layer, bn = modules[layer_name], modules[bn_name]
                saved.append((layer, {"weight": layer.weight.detach().clone(), "bias": _clone(layer.bias)}))
                saved.append(
                    (
                        bn,
                        {
                            k: _clone(getattr(bn, k))
                            for k in ("weight", "bias", "running_mean", "running_var")
                            if getattr(bn, k) is not None
                        },
                    )
                )
                like = layer.weight  # statistics a batch norm does not track default to identity, on its device
                var = bn.running_var if bn.running_var is not None else like.new_ones(bn.num_features)
                mean = bn.running_mean if bn.running_mean is not None else like.new_zeros(bn.num_features)
                gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
                beta = bn.bias if bn.bias is not None else torch.zeros_like(var)
                scale = gamma / torch.sqrt(var + bn.eps)
                shape = (-1,) + (1,) * (layer.weight.dim() - 1)
                layer.weight.mul_(scale.reshape(shape))
                old_bias = layer.bias if layer.bias is not None else torch.zeros_like(var)
                new_bias = (old_bias - mean) * scale + beta
                if layer.bias is None:
                    layer.bias = nn.Parameter(new_bias.clone())
                    saved[-2][1]["bias"] = None
                else:
                    layer.bias.copy_(new_bias)
                if bn.running_mean is not None:
                    bn.running_mean.zero_()
                    bn.running_var.fill_(1.0 - bn.eps)
                if bn.weight is not None:
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
        yield pairs
    finally:
        with torch.no_grad():
            for module, tensors in reversed(saved):
                for k, v in tensors.items():
                    if v is None:
                        module.bias = None  # type: ignore[assignment]
                    else:
                        getattr(module, k).copy_(v)


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


# ----------------------------------------------------------------------------------------------------------------
# Propagation


def _node_kind(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, _LAYERS):
            return "layer"
        if isinstance(m, _MAX_MODULES):
            return "max"
        if isinstance(m, _AVG_MODULES):
            return "avg"
        if isinstance(m, _PASS_MODULES):
            return "pass"
        if isinstance(m, _IDENTITY_MODULES) or type(m).__name__ in _IDENTITY_NAMES:
            return "identity"
        if isinstance(m, _NORM_MODULES):
            return "norm"
        if isinstance(m, _GATE_MODULES):
            return "pass"  # only ever reached through a gate, which receives no relevance
        if isinstance(m, nn.MultiheadAttention):
            return "attention"
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return "source"  # a lookup: the relevance of the embedded vectors is the input relevance of the model
        raise ValueError(f"LRP does not support module `{node.target}` ({type(m).__name__})")
    if node.op == "call_function":
        if node.target in (operator.add, torch.add):
            return "add"
        if node.target in _PASS_FUNCTIONS:
            return "pass"
        if node.target in _IDENTITY_FUNCTIONS or getattr(node.target, "__name__", "") in _IDENTITY_NAMES:
            return "identity"
        if node.target in _GATE_FUNCTIONS:
            return "pass"
        if node.target is F.layer_norm:
            return "norm"
        if node.target in (operator.mul, torch.mul):
            return _mul_kind(node, modules)
        if node.target in (operator.truediv, torch.div, torch.true_divide) and isinstance(node.args[0], torch.fx.Node):
            return "divide"
        if node.target in (F.max_pool1d, F.max_pool2d, F.adaptive_max_pool2d):
            return "max"
        if node.target in (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean, torch.sum):
            return "avg"
        if node.target in _SHAPE_FUNCTIONS:
            return "shape"
        name = getattr(node.target, "__name__", "")
        if name in _WINDOW_ATTENTION_NAMES:
            return "window_attention"
        if name in _CONSTANT_NAMES:
            return "shape"  # a tensor, but one computed from parameters only: it never carries relevance
        if name in _ROUTING_NAMES:
            return "pass"
        raise ValueError(f"LRP does not support function `{getattr(node.target, '__name__', node.target)}` ({node})")
    if node.op == "call_method":
        if node.target in _PASS_METHODS:
            return "pass"
        if node.target in _IDENTITY_METHODS:
            return "identity"
        if node.target == "sigmoid":
            return "pass"
        if node.target == "mul":
            return _mul_kind(node, modules)
        if node.target in ("div", "true_divide"):
            return "divide"
        if node.target in ("mean", "sum"):  # the epsilon rule on a sum (relevance in proportion to the summands)
            return "avg"
        if node.target in _SHAPE_METHODS:
            return "shape"
        raise ValueError(f"LRP does not support tensor method `.{node.target}()` ({node})")
    raise ValueError(f"LRP does not support graph node {node}")  # pragma: no cover


def _is_gate(node: Any, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` is produced by a sigmoid-like function (possibly through reshapes)."""
    while isinstance(node, torch.fx.Node):
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), _GATE_MODULES):
            return True
        if node.op == "call_function" and node.target in _GATE_FUNCTIONS:
            return True
        if node.op == "call_method" and node.target == "sigmoid":
            return True
        shaping = (node.op == "call_method" and node.target in _PASS_METHODS - {"relu"}) or (
            node.op == "call_function" and node.target in (torch.flatten, torch.reshape, torch.unsqueeze)
        )
        if not shaping:
            return False
        node = node.args[0]
    return False


def _mul_kind(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """``"scale"`` for a product with a constant, ``"gate0"``/``"gate1"`` for a gating product (the index of the
    gate), else unsupported. Shapes decide at run time when neither factor comes from a sigmoid: see
    :func:`_gate_index`."""
    a, b = node.args[0], node.args[1]
    tensors = [isinstance(a, torch.fx.Node), isinstance(b, torch.fx.Node)]
    if sum(tensors) == 1:
        return "scale"
    if _is_gate(a, modules) and not _is_gate(b, modules):
        return "gate0"
    if _is_gate(b, modules) and not _is_gate(a, modules):
        return "gate1"
    return "gate?"  # decided by the shapes (the broadcast factor is the gate), or refused at run time


def _kinds(nodes: Sequence[torch.fx.Node], modules: Mapping[str, nn.Module]) -> dict[torch.fx.Node, str]:
    """The kind of every node; one ``ValueError`` listing every unsupported node (not only the first).

    Nodes that do not depend on any layer's output (masks built from token ids, positions, counts) cannot carry
    relevance from a layer: an unsupported one of them is ``"opaque"`` and only an error if relevance reaches it
    (input preprocessing before the first layer, say) — checked during propagation."""
    kinds: dict[torch.fx.Node, str] = {}
    failed: dict[torch.fx.Node, str] = {}
    for n in nodes:
        try:
            kinds[n] = _node_kind(n, modules)
        except ValueError as err:
            failed[n] = str(err).removeprefix("LRP does not support ")
    carriers: set[torch.fx.Node] = set()  # data that depends on a layer's output (metadata such as x.dtype does not)
    for n in nodes:
        produces = n.op == "call_module" and any(True for _ in modules[str(n.target)].parameters())
        if kinds.get(n) != "shape" and (produces or any(a in carriers for a in n.all_input_nodes)):
            carriers.add(n)
    bad = [why for n, why in failed.items() if n in carriers]
    for n, why in failed.items():
        if n not in carriers:
            kinds[n] = "opaque:" + why
    if bad:
        listing = "\n".join(f"  - {b}" for b in bad)
        raise ValueError(f"LRP does not support {len(bad)} node(s) of this model:\n{listing}")
    return kinds


def _vjp(fn: Callable[..., Tensor], inputs: Sequence[Tensor], grad: Tensor) -> tuple[Tensor | None, ...]:
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad_outputs=grad, allow_unused=True)


def lrp(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None = None,
    composite: Composite | None = None,
    eps_pool: float = 1e-9,
    output: str = "target",
) -> LRPResult:
    """Relevance of ``model`` for ``x``. ``output="target"``: the output relevance is the logit of ``target``
    (default: the predicted class) per sample, all other outputs zero (the usual LRP start, the paper's).
    ``output="contrastive"``: additionally every other logit ``z_k`` starts with ``−z_k/(C−1)``, so weights that
    keep wrong classes down earn positive relevance (in the spirit of contrastive LRP). The model is evaluated in
    eval mode with batch norms folded; it is left exactly as it was (modes and parameters).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
        >>> res = lrp(net, torch.rand(5, 3))
        >>> torch.allclose(res.input.sum(), res.output.sum(), rtol=1e-4)  # conservation (ε → 0, no bias)
        True
        >>> sorted(res.weights)
        ['0', '2']
    """
    with _session(model) as run:
        return run(x, target, composite or Composite(), eps_pool, output)


@contextlib.contextmanager
def _session(model: nn.Module) -> Iterator[Callable[..., LRPResult]]:
    """Trace once, canonize once, restore modes and parameters on exit; yields ``run(x, target, composite, ...)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        try:
            gm = symbolic_trace(model)
        except Exception as err:  # noqa: BLE001 - tracing arbitrary user code fails in many ways
            raise ValueError(
                f"LRP propagates relevance through the torch.fx graph of the model, and {type(model).__name__} cannot "
                f"be traced symbolically ({type(err).__name__}: {str(err).splitlines()[0]}); models whose forward "
                "branches on tensor sizes or values (such as nn.Transformer's input checks) are not supported"
            ) from err
        modules = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        kinds = _kinds(nodes, modules)  # unsupported modules fail before anything changes
        with canonized(model, gm), _out_of_place(model):

            def run(x, target, composite, eps_pool, output):
                return _propagate(gm, modules, nodes, kinds, x, target, composite, eps_pool, output)

            yield run
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _output_nodes(arg: Any) -> list[torch.fx.Node]:
    """The graph nodes in the (possibly nested) structure the output node returns."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(arg, lambda a: found.append(a) or a)
    return found


def _propagate(gm, modules, nodes, kinds, x, target, composite, eps_pool, output) -> LRPResult:
    interp = torch.fx.Interpreter(gm)
    env: dict[torch.fx.Node, Any] = {}
    first_input = next(n for n in nodes if n.op == "placeholder")
    with torch.no_grad():
        for node in nodes:
            if node.op == "placeholder" and node is first_input:
                env[node] = x
            elif node.op == "placeholder":  # further arguments keep their defaults (``forward(x, mask=None)``)
                if not node.args:
                    raise ValueError(
                        f"LRP explains a model of one input; `forward` argument `{node.target}` has no default"
                    )
                env[node] = node.args[0]
            elif node.op == "output":  # what forward returns: a tensor, or a dict/tuple/object holding the logits
                env[node] = torch.fx.node.map_arg(node.args[0], lambda a: env[a])
            else:
                args = torch.fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: env[a])
                if kwargs.get("inplace") is True:  # F.relu(x, inplace=True) would overwrite a kept value
                    kwargs = {**kwargs, "inplace": False}
                env[node] = getattr(interp, node.op)(node.target, args, kwargs)
    out_node = next(n for n in nodes if n.op == "output")
    try:  # the class scores, taken out of a dict/tuple output as every other analysis does
        logits = class_scores(env[out_node])
    except TypeError:
        logits = None
    # the node that computed them: relevance starts there (other returned tensors, such as features, carry none)
    logits_node = next((a for a in _output_nodes(out_node.args[0]) if env[a] is logits), None)
    if logits_node is None or not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(
            "LRP needs a model whose output is a (batch, classes) tensor, or a dict/object with such a `logits` "
            "tensor, or a tuple whose first element is one"
        )
    if target is None:
        target = logits.argmax(1)
    onehot = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
    if output == "target":
        r_out = logits * onehot
    elif output == "contrastive":  # target logit for, every other logit (shared equally) against
        r_out = logits * onehot - logits * (1 - onehot) / max(1, logits.shape[1] - 1)
    else:
        raise ValueError(f"`output` must be 'target' or 'contrastive', got {output!r}")
    first_layer = next((n for n in nodes if kinds[n] == "layer"), None)
    rel: dict[torch.fx.Node, Tensor] = {logits_node: r_out}
    weights: dict[str, Tensor] = {}
    activations: dict[str, Tensor] = {}
    input_rel = torch.zeros_like(x)

    def give(node: Any, r: Tensor) -> None:
        # only tensors carry relevance (shape arithmetic does not); a tuple-valued node (an attention's
        # ``(output, weights)``) receives the relevance of its first element
        if isinstance(node, torch.fx.Node) and isinstance(env.get(node), (Tensor, tuple, list)):
            rel[node] = rel[node] + r if node in rel else r

    for node in reversed(nodes):
        if node not in rel or node.op == "output":
            continue
        r = rel.pop(node)
        key = str(node.target) if node.op == "call_module" else node.name
        activations[key if key not in activations else f"{key}#{node.name}"] = r
        kind = kinds[node]
        if kind == "placeholder":
            if node is first_input:
                input_rel = input_rel + r
            continue
        if kind == "get_attr":
            continue
        tensor_args = [a for a in _arg_nodes(node) if isinstance(env[a], Tensor)]
        if kind == "shape" or kind == "source":  # non-tensors, parameter-only constants, embeddings: relevance stops
            continue
        if kind.startswith("opaque:"):
            if bool(r.ne(0).any()):
                raise ValueError(f"LRP does not support {kind.removeprefix('opaque:')}: relevance reaches it")
            continue
        if kind == "divide":  # x / c: the divisor (a count, a norm) is a constant for the explanation
            give(node.args[0], r)
            continue
        if kind == "window_attention":
            r_in, r_ws = _window_attention(node, env, modules, r, composite, eps_pool)
            for wname, rw in r_ws.items():
                weights[wname] = weights[wname] + rw if wname in weights else rw
            give(node.args[0], r_in)
            continue
        if kind == "pass" and node.target is operator.getitem and isinstance(env[node.args[0]], (tuple, list)):
            if node.args[1] == 0:  # the attention output; its weights (element 1) are constants under CP-LRP
                give(node.args[0], r)
            continue
        if kind == "attention":
            module = modules[str(node.target)]
            name = str(node.target)
            q, k, v, kw = _attention_args(node, env)
            r_q, r_k, r_v, r_in_w, r_out_w = _attention(
                module, name, env[q], env[k], env[v], kw, r, composite, eps_pool
            )
            out_name = f"{name}.out_proj"
            weights[out_name] = weights[out_name] + r_out_w if out_name in weights else r_out_w
            if r_in_w is not None:
                weights[name] = weights[name] + r_in_w if name in weights else r_in_w
            for src, rs in ((q, r_q), (k, r_k), (v, r_v)):
                if rs is not None:
                    give(src, rs)
            continue
        if kind == "layer":
            module = modules[str(node.target)]
            src = node.args[0]
            rule = composite.rule_for(str(node.target), module, node is first_layer)
            bias = None if module.bias is None else module.bias.detach()
            r_in, r_w = rule(module, env[src], r, module.weight.detach(), bias, z=env[node])
            name = str(node.target)
            weights[name] = weights[name] + r_w if name in weights else r_w
            give(src, r_in)
        elif kind == "add":
            a, b = node.args[0], node.args[1]
            va = env[a] if isinstance(a, torch.fx.Node) else torch.as_tensor(a, device=r.device, dtype=r.dtype)
            vb = env[b] if isinstance(b, torch.fx.Node) else torch.as_tensor(b, device=r.device, dtype=r.dtype)
            s = r / _stabilize(va + vb, eps_pool)
            give(a, _unbroadcast(va * s, va.shape))  # a broadcast summand (a positional table) sums its share
            give(b, _unbroadcast(vb * s, vb.shape))
        elif kind == "norm":
            src = tensor_args[0]
            s = r / _stabilize(env[node], eps_pool)
            fn = _frozen_norm(node, modules, env[src])
            (g,) = _vjp(fn, [env[src]], s)
            give(src, env[src] * g)
        elif kind == "identity":
            give(tensor_args[0], r)
        elif kind == "scale":
            give(tensor_args[0], r)  # R_in = c·x / (c·x) · R
        elif kind.startswith("gate"):
            a, b = node.args[0], node.args[1]
            gate = _gate_index(kind, env[a], env[b], node)
            signal = (a, b)[1 - gate]
            give(signal, _unbroadcast(r, env[signal].shape))
        elif kind == "max" or kind == "pass":
            fn = _callable(node, modules, interp)
            values = [env[a] for a in tensor_args]
            grads = _vjp(lambda *t, fn=fn, node=node: fn(*_substitute(node, t, env)), values, r)
            for a, g in zip(tensor_args, grads):
                if g is not None:
                    give(a, g)
        elif kind == "avg":
            fn = _callable(node, modules, interp)
            src = tensor_args[0]
            s = r / _stabilize(env[node], eps_pool)
            (g,) = _vjp(lambda t, fn=fn, node=node: fn(*_substitute(node, (t,), env)), [env[src]], s)
            give(src, env[src] * g)
    return LRPResult(input=input_rel, activations=activations, weights=weights, output=r_out)


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")  # fmt: skip


def _attention_args(node: torch.fx.Node, env: Mapping) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The query/key/value graph nodes of an ``nn.MultiheadAttention`` call and its other arguments (evaluated)."""
    bound = dict(zip(_MHA_ARGS, node.args)) | dict(node.kwargs)
    values = {k: (env[v] if isinstance(v, torch.fx.Node) else v) for k, v in bound.items() if k not in _MHA_ARGS[:3]}
    return bound["query"], bound["key"], bound["value"], values


def _attention(
    m: nn.MultiheadAttention,
    name: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kw: Mapping[str, Any],
    r_out: Tensor,
    composite: Composite,
    eps: float,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor | None, Tensor]:
    """Relevance through ``nn.MultiheadAttention`` (packed projections, any head count, masks, batch_first or not).

    The output projection and the query/key/value projections use the composite's linear rules (``name.out_proj``
    and ``name``). Between them, with ``c_h = A_h v_h`` per head:

    * ``composite.attention == "cp"`` — CP-LRP (Ali et al. 2022, "XAI for Transformers: better explanations through
      conservative propagation"): the attention weights ``A`` are constants, so the mixing is linear and relevance
      flows only through the values, ``R_v = v ⊙ Aᵀ(R_c / c)``; queries and keys get none and the input projection
      gets no weight relevance (only its value rows would have any: a partial, misleading ranking).
    * ``"attnlrp"`` — AttnLRP (Achtibat et al. 2024, Prop. 3.3 and 3.1): the bilinear products ``A v`` and ``q kᵀ``
      split relevance uniformly between their factors (epsilon rule on each half), and the softmax passes
      ``R_x = x ⊙ (R_A − A Σ R_A)`` to its logits (masked entries excluded); the scale ``1/√d`` is an identity.

    Returns ``(R_query, R_key, R_value, R_in_proj_weight, R_out_proj_weight)``; with self-attention the three input
    relevances go to the same node and add up.
    """
    if m.in_proj_weight is None or m.bias_k is not None or m.add_zero_attn:
        raise ValueError(
            f"LRP supports nn.MultiheadAttention with packed projections and without add_bias_kv/add_zero_attn; "
            f"`{name}` has {'separate q/k/v projections' if m.in_proj_weight is None else 'extra key/value entries'}"
        )
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value, r_out = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), r_out.unsqueeze(1)
    if not m.batch_first or unbatched:  # -> (N, L, E)
        query, key, value, r_out = (t.transpose(0, 1) for t in (query, key, value, r_out))
    heads, hd = m.num_heads, m.head_dim
    inner = heads * hd
    w = m.in_proj_weight.detach()
    b = None if m.in_proj_bias is None else m.in_proj_bias.detach()
    ws = [w[i * inner : (i + 1) * inner] for i in range(3)]
    bs = [None if b is None else b[i * inner : (i + 1) * inner] for i in range(3)]
    proxy = m.out_proj  # an nn.Linear: tells the rules to apply F.linear
    n, length, src = query.shape[0], query.shape[1], key.shape[1]
    q, k, v = (F.linear(t, wi, bi) for t, wi, bi in zip((query, key, value), ws, bs))

    def split(t: Tensor) -> Tensor:  # (N, S, inner) -> (N, H, S, hd)
        return t.reshape(t.shape[0], t.shape[1], heads, hd).transpose(1, 2)

    def merge(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], inner)

    qh, kh, vh = split(q), split(k), split(v)
    raw = qh @ kh.transpose(-2, -1)  # unscaled scores
    mask = torch.zeros_like(raw)
    kpm = F._canonical_mask(
        mask=kw.get("key_padding_mask"), mask_name="key_padding_mask", other_type=None, other_name="",
        target_type=raw.dtype, check_other=False,
    )  # fmt: skip
    am = F._canonical_mask(
        mask=kw.get("attn_mask"), mask_name="attn_mask", other_type=None, other_name="", target_type=raw.dtype,
        check_other=False,
    )  # fmt: skip
    if am is not None:
        mask = mask + (am.view(n, heads, length, src) if am.dim() == 3 else am.view(1, 1, length, src))
    if kpm is not None:
        mask = mask + kpm.view(n, 1, 1, src)
    if kw.get("is_causal") and am is None:
        mask = mask.masked_fill(torch.ones(length, src, dtype=torch.bool, device=raw.device).triu(1), float("-inf"))
    logits = raw / math.sqrt(hd) + mask
    attn = logits.softmax(-1)
    ch = attn @ vh
    c = merge(ch)
    wo = m.out_proj.weight.detach()
    bo = None if m.out_proj.bias is None else m.out_proj.bias.detach()
    out_rule = composite.rule_for(f"{name}.out_proj", m.out_proj, False)
    r_c, r_wo = out_rule(m.out_proj, c, r_out, wo, bo, z=F.linear(c, wo, bo))
    r_ch = split(r_c)
    cp = composite.attention == "cp"
    s = r_ch / _stabilize(ch if cp else 2 * ch, eps)
    r_vh = vh * (attn.transpose(-2, -1) @ s)
    in_rule = composite.rule_for(name, m, False)
    r_v, r_wv = in_rule(proxy, value, merge(r_vh), ws[2], bs[2], z=v)
    r_q = r_k = r_w = None
    if not cp:
        r_attn = attn * (s @ vh.transpose(-2, -1))
        finite = torch.isfinite(logits)
        x = torch.where(finite, logits, torch.zeros_like(logits))
        r_logits = x * (r_attn - attn * r_attn.sum(-1, keepdim=True))
        scaled = raw / math.sqrt(hd)  # the mask is a constant summand: it keeps its share (epsilon rule on the sum)
        r_raw = torch.where(finite, r_logits * scaled / _stabilize(x, eps), torch.zeros_like(r_logits))
        s2 = r_raw / _stabilize(2 * raw, eps)
        r_qh = qh * (s2 @ kh)
        r_kh = kh * (s2.transpose(-2, -1) @ qh)
        r_q, r_wq = in_rule(proxy, query, merge(r_qh), ws[0], bs[0], z=q)
        r_k, r_wk = in_rule(proxy, key, merge(r_kh), ws[1], bs[1], z=k)
        r_w = torch.cat([r_wq, r_wk, r_wv])

    def back(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        if not m.batch_first or unbatched:
            t = t.transpose(0, 1)
        return t.squeeze(1) if unbatched else t

    return back(r_q), back(r_k), back(r_v), r_w, r_wo


def _frozen_norm(node: torch.fx.Node, modules: Mapping[str, nn.Module], x: Tensor) -> Callable[[Tensor], Tensor]:
    """The normalisation of ``node`` with its statistics held constant (the LN rule of Ali et al. 2022, used by
    AttnLRP): ``(t − mean(t)) / σ(x) · γ`` (``t / rms(x) · γ`` for RMSNorm), a linear map of ``t`` whose
    gradient × input, with the epsilon stabiliser on the output, conserves relevance up to the shift ``β``."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        weight = getattr(m, "weight", None)
        if isinstance(m, nn.GroupNorm):
            groups, eps = m.num_groups, m.eps

            def group(t: Tensor) -> Tensor:
                shape = t.shape
                g = t.reshape(shape[0], groups, -1)
                ref = x.detach().reshape(shape[0], groups, -1)
                std = (ref.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
                out = ((g - g.mean(-1, keepdim=True)) / std).reshape(shape)
                if weight is not None:
                    out = out * weight.detach().reshape(1, -1, *([1] * (len(shape) - 2)))
                return out

            return group
        dims = tuple(range(-len(m.normalized_shape), 0))
        eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
        rms = isinstance(m, nn.RMSNorm)
    else:  # F.layer_norm(input, normalized_shape, weight, bias, eps)
        args = list(node.args) + [None] * (5 - len(node.args))
        shape = node.kwargs.get("normalized_shape", args[1])
        weight_arg = node.kwargs.get("weight", args[2])
        weight = _param_value(weight_arg, modules)
        eps = node.kwargs.get("eps", args[4] if args[4] is not None else 1e-5)
        dims = tuple(range(-len(shape), 0))
        rms = False
    ref = x.detach()
    if rms:
        scale = (ref.pow(2).mean(dims, keepdim=True) + eps).rsqrt()
    else:
        scale = (ref.var(dims, unbiased=False, keepdim=True) + eps).rsqrt()

    def frozen(t: Tensor) -> Tensor:
        centred = t if rms else t - t.mean(dims, keepdim=True)
        out = centred * scale
        return out if weight is None else out * weight.detach()

    return frozen


def _param_value(arg: Any, modules: Mapping[str, nn.Module]) -> Tensor | None:
    """The tensor behind a ``get_attr`` node argument (a parameter of the traced model), or ``None``."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        owner, _, attr = str(arg.target).rpartition(".")
        return getattr(modules[owner] if owner else modules[""], attr)
    return arg if isinstance(arg, Tensor) else None


def _gate_index(kind: str, a: Tensor, b: Tensor, node: torch.fx.Node) -> int:
    if kind in ("gate0", "gate1"):
        return int(kind[-1])
    if a.numel() < b.numel():
        return 0
    if b.numel() < a.numel():
        return 1
    raise ValueError(
        f"LRP does not support the product `{node.name}` of two full-size tensors (neither factor is a gate: not "
        "produced by a sigmoid and not broadcast over the other)"
    )


def _unbroadcast(r: Tensor, shape: torch.Size) -> Tensor:
    """``r`` summed down to ``shape`` (the signal of a gating product may itself have been broadcast)."""
    if r.shape == shape:
        return r
    while r.dim() > len(shape):
        r = r.sum(0)
    for i, (have, want) in enumerate(zip(r.shape, shape)):
        if want == 1 and have != 1:
            r = r.sum(i, keepdim=True)
    return r


@contextlib.contextmanager
def _constant_softmax() -> Iterator[None]:
    """``F.softmax`` returns detached values inside the block: attention weights become constants (CP-LRP) in code we
    do not own (torchvision's window attention calls ``F.softmax``)."""
    original = F.softmax

    def detached(*args: Any, **kwargs: Any) -> Tensor:
        return original(*args, **kwargs).detach()

    F.softmax = detached  # type: ignore[assignment]
    try:
        yield
    finally:
        F.softmax = original  # type: ignore[assignment]


def _window_attention(
    node: torch.fx.Node, env: Mapping, modules: Mapping[str, nn.Module], r: Tensor, composite: Composite, eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """CP-LRP through torchvision's ``shifted_window_attention`` (Swin): with the attention weights constant, the
    block (roll, window partition, value projection, attention mixing, output projection, reverse) is affine in its
    input, and epsilon-LRP through a chain of affine maps without activations equals gradient × input of the chain
    with ``s = R / z`` at its output (the intermediate ``a/z`` factors cancel). So ``R_in = x ⊙ Jᵀs`` and the weight
    relevance of the output projection is ``W ⊙ ∂(z·s)/∂W``. As for ``nn.MultiheadAttention``, queries and keys get
    no relevance and the packed q/k/v projection no weight relevance (only its value rows would have any)."""
    if composite.attention != "cp":
        raise ValueError(
            f"LRP supports Swin's window attention (`{node.name}`) with attention='cp' only; AttnLRP through shifted "
            "windows is not implemented"
        )
    fn = node.target
    args = [env[a] if isinstance(a, torch.fx.Node) else a for a in node.args]
    kwargs = {k: (env[v] if isinstance(v, torch.fx.Node) else v) for k, v in node.kwargs.items()}
    proj_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("proj_weight")
    x = args[0].detach().requires_grad_(True)
    proj = args[2].detach().requires_grad_(True)
    with torch.enable_grad(), _constant_softmax():
        out = fn(x, args[1].detach(), proj, *args[3:], **kwargs)
    s = r / _stabilize(out.detach(), eps)
    g_x, g_proj = torch.autograd.grad(out, (x, proj), grad_outputs=s)
    weights: dict[str, Tensor] = {}
    if isinstance(proj_node, torch.fx.Node) and proj_node.op == "get_attr":
        weights[str(proj_node.target).rpartition(".")[0]] = proj.detach() * g_proj
    return x.detach() * g_x, weights


@contextlib.contextmanager
def _out_of_place(model: nn.Module) -> Iterator[None]:
    """In-place activations (``nn.ReLU(inplace=True)``) would overwrite the values LRP keeps for its backward pass:
    run them out of place during the analysis and give the modules their flags back."""
    flagged = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in flagged:
        m.inplace = False  # type: ignore[assignment]
    try:
        yield
    finally:
        for m in flagged:
            m.inplace = True  # type: ignore[assignment]


def _callable(node: torch.fx.Node, modules: Mapping[str, nn.Module], interp: torch.fx.Interpreter):
    def call(*args: Any) -> Any:
        kwargs = dict(torch.fx.node.map_arg(node.kwargs, lambda a: a))
        if kwargs.get("inplace") is True:
            kwargs["inplace"] = False
        return getattr(interp, node.op)(node.target, args, kwargs)

    return call


def _arg_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph nodes among ``node.args`` (also inside lists, e.g. ``torch.cat([a, b])``), in order."""
    found: list[torch.fx.Node] = []
    for a in node.args:
        for v in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(v, torch.fx.Node):
                found.append(v)
    return found


def _substitute(node: torch.fx.Node, tensors: Sequence[Tensor], env: Mapping) -> tuple:
    """``node.args`` with its tensor arguments replaced, in order, by ``tensors`` (others from ``env``)."""
    it = iter(tensors)

    def sub(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return next(it) if isinstance(env[a], Tensor) else env[a]  # shape values stay as computed
        return a

    args = []
    for a in node.args:
        if isinstance(a, (list, tuple)):
            args.append(type(a)(sub(v) for v in a))
        else:
            args.append(sub(a))
    return tuple(args)


def weight_relevance(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None = None,
    composite: Composite | None = None,
    output: str = "target",
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Weight relevance of every Linear/Conv layer summed over all samples of ``x``, computed in batches."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    total: dict[str, Tensor] = {}
    with _session(model) as run:
        for start in range(0, x.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            res = run(x[sl], None if target is None else target[sl], composite or Composite(), 1e-9, output)
            for name, r in res.weights.items():
                if not torch.isfinite(r).all():
                    raise FloatingPointError(f"LRP produced non-finite relevance for layer `{name}`")
                total[name] = total[name] + r if name in total else r
    return total
