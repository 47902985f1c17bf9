"""LRP through attention (CP-LRP and AttnLRP) and transformer graphs: conservation in float64, agreement with
``lxt`` (the AttnLRP authors' reference implementation) on one transformer block, torchvision's ViT end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_xai.attribution.lrp import Composite, Epsilon, lrp

EXACT = Epsilon(eps=1e-12)


class Block(nn.Module):
    """A pre-norm transformer block (LayerNorm → attention → residual, LayerNorm → MLP → residual), flattened so that
    every output is a "class" for the LRP entry point."""

    def __init__(self, dim: int = 8, heads: int = 2, bias: bool = True, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=batch_first)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim, bias=bias)

    def forward(self, x):
        a = self.ln1(x)
        h = x + self.attn(a, a, a, need_weights=False)[0]
        out = h + self.fc2(self.act(self.fc1(self.ln2(h))))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out.flatten(1)


class AttentionOnly(nn.Module):
    def __init__(self, dim=8, heads=2, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(dim, heads, bias=False, batch_first=batch_first)
        self.head = nn.Linear(dim, 3, bias=False)

    def forward(self, x, pad=None):
        out = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return self.head(out.sum(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_cp_lrp_conserves_relevance_through_attention(batch_first):
    torch.manual_seed(0)
    net = AttentionOnly(batch_first=batch_first).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    res = lrp(net, x, composite=Composite(default=EXACT, attention="cp"), eps_pool=1e-12)
    torch.testing.assert_close(res.input.sum(), res.output.sum(), rtol=1e-9, atol=1e-12)
    assert res.weights["attn.out_proj"].shape == (8, 8)
    assert "attn" not in res.weights  # CP-LRP: no weight relevance for the q/k/v projection


def test_cp_lrp_per_sample_conservation_with_a_padding_mask():
    torch.manual_seed(1)
    net = AttentionOnly().double()

    class Padded(nn.Module):  # fx traces the mask computation too
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x, x[..., 0] > 1.0)

    x = torch.randn(4, 6, 8, dtype=torch.float64)
    x[:, 0, 0] = 0.0  # never an all-padding row
    res = lrp(Padded(), x, composite=Composite(default=EXACT), eps_pool=1e-12)
    torch.testing.assert_close(res.input.sum((1, 2)), res.output.sum(1), rtol=1e-9, atol=1e-12)
    padded = x[..., 0] > 1.0
    assert padded.any()
    # padded keys are never attended to: their value path carries no relevance, only the query-side residual
    assert torch.all(res.input[padded] == 0)


def test_attnlrp_gives_queries_and_keys_relevance_and_weight_relevance():
    torch.manual_seed(2)
    net = AttentionOnly().double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    cp = lrp(net, x, composite=Composite(default=EXACT, attention="cp"), eps_pool=1e-12)
    attn = lrp(net, x, composite=Composite(default=EXACT, attention="attnlrp"))
    assert attn.weights["attn"].shape == (24, 8)  # q, k and v rows
    assert attn.weights["attn"][:16].abs().sum() > 0  # queries and keys get relevance
    assert not torch.allclose(cp.input, attn.input)


def _lxt_block(block: Block, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The block rebuilt from lxt's explicit rules: epsilon for linear maps and sums, the LN rule, identity for GELU,
    CP-LRP (lxt's own multi_head_attention_cp) or AttnLRP (softmax and uniform matmul rules, the 1/√d scale as a
    constant factor) for attention."""
    import lxt.explicit.functional as lf
    import lxt.explicit.rules as rules
    from lxt.explicit.modules import LinearInProjection, LinearOutProjection
    from lxt.explicit.special import multi_head_attention_cp

    m = block.attn
    e, heads, hd = m.embed_dim, m.num_heads, m.head_dim
    w, b = m.in_proj_weight, m.in_proj_bias
    wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
    bq, bk, bv = b[:e], b[e : 2 * e], b[2 * e :]

    def layer_norm(t, ln):  # lxt's LN rule, with its stabiliser at 1e-12 like every other step here
        return lf.layer_norm_grad_fn.apply(t, ln.weight, ln.bias, ln.eps, 1e-12)

    a = layer_norm(x, block.ln1)
    if mode == "cp":
        v_proj = rules.EpsilonRule(LinearInProjection(wv, bv), epsilon=1e-12)
        out_proj = rules.EpsilonRule(LinearOutProjection(m.out_proj.weight, m.out_proj.bias), epsilon=1e-12)
        fixed = rules.epsilon_lrp  # lxt's CP attention stabilises A·v with a fixed 1e-6: the same 1e-12 as elsewhere
        rules.epsilon_lrp = lambda fn, _eps, *inputs: fixed(fn, 1e-12, *inputs)
        try:
            att, _ = multi_head_attention_cp(
                a, a, a, True, heads, hd, wq, bq, wk, bk, v_proj, out_proj, need_weights=False
            )
        finally:
            rules.epsilon_lrp = fixed
    else:
        n, length, _ = a.shape

        def split(t):
            return t.view(n, length, heads, hd).transpose(1, 2)

        q = split(lf.linear_epsilon(a, wq, bq, epsilon=1e-12))
        k = split(lf.linear_epsilon(a, wk, bk, epsilon=1e-12))
        v = split(lf.linear_epsilon(a, wv, bv, epsilon=1e-12))
        scale = torch.tensor(1.0 / math.sqrt(hd), dtype=x.dtype)
        scores = lf.mul2(lf.matmul(q, k.transpose(-2, -1), epsilon=1e-12), scale)  # a constant factor: identity
        probs = lf.softmax(scores, -1)
        ctx = lf.matmul(probs, v, epsilon=1e-12).transpose(1, 2).reshape(n, length, e)
        att = lf.linear_epsilon(ctx, m.out_proj.weight, m.out_proj.bias, epsilon=1e-12)
    h = lf.add2(x, att, epsilon=1e-12)
    y = layer_norm(h, block.ln2)
    y = lf.linear_epsilon(y, block.fc1.weight, block.fc1.bias, epsilon=1e-12)
    y = rules.identity(F.gelu, y)
    y = lf.linear_epsilon(y, block.fc2.weight, block.fc2.bias, epsilon=1e-12)
    return lf.add2(h, y, epsilon=1e-12).flatten(1)


@pytest.mark.parametrize("mode", ["cp", "attnlrp"])
def test_transformer_block_agrees_with_lxt(mode):
    pytest.importorskip("lxt")
    torch.manual_seed(3)
    block = Block().double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    ours = lrp(block, x, composite=Composite(default=EXACT, attention=mode), eps_pool=1e-12)
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = _lxt_block(block, xr, mode)
    torch.testing.assert_close(out.detach(), block(x))  # the same function
    (reference,) = torch.autograd.grad(out, xr, grad_outputs=ours.output)  # lxt: the gradient IS the relevance
    assert reference.abs().sum() > 0
    torch.testing.assert_close(ours.input, reference, rtol=1e-6, atol=1e-9)


def test_vit_end_to_end_conservation_and_weight_relevance():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(4)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    ).double()
    nn.init.normal_(vit.heads.head.weight)  # torchvision initialises the head at zero
    for module in vit.modules():  # biases and the positional embedding absorb relevance: take them out
        for name in ("bias", "in_proj_bias"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                nn.init.zeros_(getattr(module, name))
    nn.init.zeros_(vit.encoder.pos_embedding)
    nn.init.zeros_(vit.class_token)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    res = lrp(vit, x, composite=Composite(default=EXACT), eps_pool=1e-12)
    # LayerNorm's shift is zero too, so relevance is conserved from the logit to the pixels
    torch.testing.assert_close(res.input.sum(), res.output.sum(), rtol=1e-6, atol=1e-9)
    assert {"conv_proj", "heads.head", "encoder.layers.encoder_layer_0.self_attention.out_proj"} <= set(res.weights)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())  # the model is left as it was


def test_attention_composite_is_checked():
    with pytest.raises(ValueError, match=r"`attention` must be one of \('cp', 'attnlrp'\), got 'soft'"):
        Composite(attention="soft")


def test_swin_window_attention_conserves_relevance_and_restores_softmax():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(5)
    swin = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=5
    ).double()
    for module in swin.modules():  # biases and the relative position bias absorb relevance: take them out
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            nn.init.zeros_(module.bias)
        if hasattr(module, "relative_position_bias_table"):
            nn.init.zeros_(module.relative_position_bias_table)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    res = lrp(swin, x, composite=Composite(default=EXACT), eps_pool=1e-12)
    torch.testing.assert_close(res.input.sum(), res.output.sum(), rtol=1e-8, atol=1e-12)
    assert "features.1.1.attn.proj" in res.weights and "features.1.1.attn.qkv" not in res.weights
    assert F.softmax.__name__ == "softmax" and F.softmax(torch.zeros(2), 0).requires_grad is False
    z = torch.zeros(2, requires_grad=True)
    assert F.softmax(z, 0).requires_grad  # the detaching stand-in is gone
    with pytest.raises(ValueError, match="attention='cp' only"):
        lrp(swin, x, composite=Composite(attention="attnlrp"))


def test_token_model_relevance_reaches_the_embeddings_and_masks_carry_none():
    """The names CharTransformer: padding masks, positions and counts are built from token ids (they carry no
    relevance, whatever their operations), embeddings are where relevance stops, the pooled mean divides by a count
    (a constant): relevance is conserved from the logit to the token and position embeddings."""
    from lightning_xai.models.char_transformer import CharTransformer

    torch.manual_seed(6)
    net = CharTransformer(num_classes=2, dim=16, heads=2, depth=2).double()
    for module in net.modules():
        for name in ("bias", "in_proj_bias"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                nn.init.zeros_(getattr(module, name))
    tokens = torch.randint(1, 27, (3, 7))
    tokens[0, 4:] = 0  # padding
    res = lrp(net, tokens, composite=Composite(default=EXACT), eps_pool=1e-12)
    at_embeddings = res.activations["embed"].sum() + res.activations["pos"].sum()
    torch.testing.assert_close(at_embeddings, res.output.sum(), rtol=1e-8, atol=1e-12)
    assert torch.all(res.activations["embed"][0, 4:] == 0)  # padded tokens are pooled out and masked as keys
    assert {"blocks.0.attn.out_proj", "blocks.1.mlp.0", "head"} <= set(res.weights)


def test_relevance_reaching_an_unsupported_operation_is_an_error():
    class Preprocessed(nn.Module):  # an unsupported operation on the data path before the first layer
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.atan(x))

    with pytest.raises(ValueError, match=r"LRP does not support function `atan`.*relevance reaches it"):
        lrp(Preprocessed(), torch.rand(2, 3))
