"""Whole attention heads of ``nn.MultiheadAttention`` removed physically.

A head whose value rows are all at 0 bits (weights and gated biases exactly zero) outputs exactly zero whatever its
attention pattern, so its query, key and value rows and the matching input columns of ``out_proj`` can go. PyTorch's
``nn.MultiheadAttention`` ties the head width to ``embed_dim // num_heads`` (its functional forward and the fused
encoder fast path both assume the projections are ``embed_dim`` wide), so a module that lost heads computes with
:class:`PrunedHeadsAttention`'s forward: the same projections, ``scaled_dot_product_attention`` and the same
output projection, at ``num_heads * head_dim`` inner width. The class is swapped in place (the module object, its
parametrizations, quantizers and optimizer state stay the same objects) and swapped back when every head returns
(a rollback, or a padded full-size state dict loaded into a fresh instance).

When every head is dead all go: the module then outputs ``out_proj``'s bias, as it did before. Single rows of a
live head are not removed: dropping query/key dimensions changes the ``1/sqrt(head_dim)`` scale
and heads must keep one width. Written here because neither torch-pruning (which prunes ``embed_dim`` as a whole,
coupled with the residual stream) nor PyTorch offers head removal that keeps ``embed_dim``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "PrunedHeadsAttention",
    "dead_heads",
    "head_rows",
    "head_removal_problem",
    "settle_encoders",
    "sync_heads",
    "head_gate",
    "attention_of",
]


class PrunedHeadsAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose query/key/value projections are ``num_heads * head_dim`` wide instead of
    ``embed_dim`` (some heads removed). Same arguments and results as ``nn.MultiheadAttention.forward``; per-head
    3-D attention masks must have ``batch * num_heads`` (remaining heads) entries."""

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (L, N, E) from here on, as in torch's functional forward
        tgt_len, bsz, _ = query.shape
        heads, hd = self.num_heads, self.head_dim
        inner = heads * hd
        w = self.in_proj_weight
        b = self.in_proj_bias
        q = F.linear(query, w[:inner], None if b is None else b[:inner])
        k = F.linear(key, w[inner : 2 * inner], None if b is None else b[inner : 2 * inner])
        v = F.linear(value, w[2 * inner :], None if b is None else b[2 * inner :])
        src_len = k.shape[0]

        def split(t: Tensor, length: int) -> Tensor:  # (length, N, inner) -> (N, heads, length, hd)
            return t.reshape(length, bsz, heads, hd).permute(1, 2, 0, 3)

        q, k, v = split(q, tgt_len), split(k, src_len), split(v, src_len)
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=q.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=q.dtype,
            check_other=False,
        )
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                if attn_mask.shape[0] != bsz * heads:
                    raise ValueError(
                        f"`attn_mask` of shape {tuple(attn_mask.shape)} has a first dimension other than batch * "
                        f"num_heads = {bsz} * {heads}: this attention lost heads to pruning, so per-head masks must "
                        "cover the remaining heads only"
                    )
                mask = attn_mask.view(bsz, heads, tgt_len, src_len)
            else:
                mask = attn_mask.view(1, 1, tgt_len, src_len)
        if key_padding_mask is not None:
            pad = key_padding_mask.view(bsz, 1, 1, src_len)
            mask = pad if mask is None else mask + pad
        dropout = self.dropout if self.training else 0.0
        causal = is_causal and mask is None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
            if causal:
                scores = scores.masked_fill(
                    torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            elif mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
            weights = None
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, inner)
        gate = self.__dict__.get("_head_gate")  # set by C-SWAP's channel masker: zero chosen heads (batch first)
        if gate is not None:
            gated = gate(self.out_proj, (out.transpose(0, 1),))
            if gated is not None:
                out = gated[0].transpose(0, 1)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)  # functional, as nn.MultiheadAttention does
        if weights is not None and average_attn_weights:  # no heads left: no attention to average, zeros
            weights = weights.mean(dim=1) if heads else weights.new_zeros(bsz, tgt_len, src_len)
        if unbatched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


_SKIP = {"__dict__", "__weakref__"}


def _set_class(module: nn.Module, pruned: bool) -> None:
    """Swap ``module``'s class between its plain MultiheadAttention class and :class:`PrunedHeadsAttention`, below a
    parametrization's generated class if there is one (so removing the parametrization lands on the right class)."""
    cls = type(module)
    wrapped = parametrize.is_parametrized(module)
    base = cls.__bases__[0] if wrapped else cls
    if pruned == issubclass(base, PrunedHeadsAttention):
        return
    if pruned:
        target = PrunedHeadsAttention if base is nn.MultiheadAttention else _pruned_subclass(base)
    else:
        target = getattr(base, "_plain_base", nn.MultiheadAttention)
    if wrapped:
        attrs = {k: v for k, v in cls.__dict__.items() if k not in _SKIP}
        target = type(cls.__name__, (target,), attrs)
    module.__class__ = target
    # the fused encoder-layer fast path (and nested tensors) assume embed_dim-wide projections; they check this flag
    module._qkv_same_embed_dim = not pruned


_SUBCLASSES: dict[type, type] = {}


def _pruned_subclass(base: type) -> type:
    """A PrunedHeadsAttention variant of a user subclass of nn.MultiheadAttention (its own methods kept, forward
    replaced)."""
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(
            f"PrunedHeads{base.__name__}",
            (PrunedHeadsAttention, base),
            {"forward": PrunedHeadsAttention.forward, "_plain_base": base},
        )
    return _SUBCLASSES[base]


def sync_heads(module: nn.MultiheadAttention, in_proj_rows: int) -> None:
    """Make ``num_heads`` (and the class) agree with an ``in_proj_weight`` of ``in_proj_rows`` rows."""
    inner = in_proj_rows // 3
    module.num_heads = inner // module.head_dim
    _set_class(module, inner != module.embed_dim)


def head_rows(module: nn.MultiheadAttention, heads: list[int]) -> list[int]:
    """``in_proj_weight`` rows (query, key and value) of ``heads``."""
    inner, hd = module.num_heads * module.head_dim, module.head_dim
    return sorted(part * inner + h * hd + j for part in range(3) for h in heads for j in range(hd))


def dead_heads(module: nn.MultiheadAttention, dead_rows: set[int]) -> list[int]:
    """Heads whose value rows are all in ``dead_rows`` (rows of ``in_proj_weight``): they output exactly zero."""
    inner, hd = module.num_heads * module.head_dim, module.head_dim
    return [h for h in range(module.num_heads) if all(2 * inner + h * hd + j in dead_rows for j in range(hd))]


def head_removal_problem(module: nn.MultiheadAttention) -> str | None:
    """Why heads of ``module`` cannot be removed here, or None."""
    if module.in_proj_weight is None:
        return "its query/key/value projections are separate (kdim/vdim differ from embed_dim); not sliced here"
    if module.bias_k is not None or module.add_zero_attn:
        return "it adds learned or zero key/value entries (add_bias_kv / add_zero_attn); heads are not sliced here"
    return None


def settle_encoders(model: nn.Module) -> None:
    """Turn off ``nn.TransformerEncoder``'s nested-tensor fast path while one of its layers has lost heads (that path
    feeds nested tensors through fused kernels that assume ``embed_dim``-wide projections) and restore the user's
    setting once every head is back."""
    for module in model.modules():
        if not isinstance(module, nn.TransformerEncoder):
            continue
        pruned = any(isinstance(getattr(layer, "self_attn", None), PrunedHeadsAttention) for layer in module.layers)
        if pruned and "_lxai_use_nested_tensor" not in module.__dict__:
            module._lxai_use_nested_tensor = getattr(module, "use_nested_tensor", False)
            module.use_nested_tensor = False
        elif not pruned and "_lxai_use_nested_tensor" in module.__dict__:
            module.use_nested_tensor = module.__dict__.pop("_lxai_use_nested_tensor")


def attention_of(model: nn.Module, name: str) -> str | None:
    """The name of the ``nn.MultiheadAttention`` whose (functionally called) ``out_proj`` is ``name``, else None."""
    parent, _, attr = name.rpartition(".")
    if attr != "out_proj":
        return None
    module = model.get_submodule(parent) if parent else model
    return parent if isinstance(module, nn.MultiheadAttention) else None


@contextlib.contextmanager
def head_gate(module: nn.MultiheadAttention, hook: Any) -> Iterator[None]:
    """Inside: ``hook(out_proj, (heads_output,))`` sees (and may replace) the concatenated head outputs, batch first,
    just before ``out_proj`` — a forward pre-hook on a layer nn.MultiheadAttention only calls functionally. The module
    computes with :class:`PrunedHeadsAttention`'s forward meanwhile (the same function); its class comes back on
    exit."""
    was_pruned = isinstance(module, PrunedHeadsAttention)
    _set_class(module, True)
    module._head_gate = hook
    try:
        yield
    finally:
        module.__dict__.pop("_head_gate", None)
        if not was_pruned:
            sync_heads(module, module.in_proj_weight.shape[0])
