"""Whole attention heads removed physically: the pruned forward against nn.MultiheadAttention with the same heads
silenced (the independent reference), removal inside nn.TransformerEncoder / torchvision's ViT / the Lightning demo
Transformer, rollback, padded and compact reloads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_xai.pruning.heads import PrunedHeadsAttention, settle_encoders
from lightning_xai.pruning.surgery import (
    ChannelCut,
    _rollback,
    apply_cuts,
    effective_state_dict,
    padded_state_dict,
    remove_dead_channels,
    resize_to_state_dict,
)
from lightning_xai.quantization.install import install_quantizers, quantized_layers


def _silence(mha: nn.MultiheadAttention, heads: list[int]) -> None:
    """Zero the value rows (weights and biases) of ``heads``: their output is then exactly zero."""
    e, hd = mha.embed_dim, mha.head_dim
    with torch.no_grad():
        for h in heads:
            mha.in_proj_weight[2 * e + h * hd : 2 * e + (h + 1) * hd] = 0
            mha.in_proj_bias[2 * e + h * hd : 2 * e + (h + 1) * hd] = 0


def _cut(mha: nn.MultiheadAttention, heads: list[int]) -> list:
    """Remove ``heads`` with apply_cuts on a module holding ``mha`` as ``a``."""
    e, hd = mha.embed_dim, mha.head_dim
    rows = tuple(p * e + h * hd + j for p in range(3) for h in heads for j in range(hd))
    cols = tuple(h * hd + j for h in heads for j in range(hd))
    holder = nn.Module()
    holder.a = mha
    return apply_cuts(holder, [ChannelCut("a", "out", rows), ChannelCut("a.out_proj", "in", cols)])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both", "bool-causal"])
def test_pruned_forward_matches_silenced_heads(batch_first, masks):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(12, 4, batch_first=batch_first, dtype=torch.float64).eval()
    _silence(ref, [1, 3])
    pruned = nn.MultiheadAttention(12, 4, batch_first=batch_first, dtype=torch.float64).eval()
    pruned.load_state_dict(ref.state_dict())
    _cut(pruned, [1, 3])
    assert isinstance(pruned, PrunedHeadsAttention) and pruned.num_heads == 2
    assert pruned.in_proj_weight.shape == (18, 12) and pruned.out_proj.weight.shape == (12, 6)
    n, length, src = 3, 5, 5
    q = torch.randn(n, length, 12, dtype=torch.float64)
    kv = torch.randn(n, src, 12, dtype=torch.float64)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    kwargs = {}
    if masks in ("padding", "both"):
        pad = torch.zeros(n, src, dtype=torch.bool)
        pad[0, -2:] = True
        kwargs["key_padding_mask"] = pad
    if masks in ("causal", "both"):
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    if masks == "bool-causal":
        kwargs["attn_mask"] = torch.ones(length, src, dtype=torch.bool).triu(1)
    for need_weights in (False, True):
        out_ref, w_ref = ref(q, kv, kv, need_weights=need_weights, average_attn_weights=False, **kwargs)
        out, w = pruned(q, kv, kv, need_weights=need_weights, average_attn_weights=False, **kwargs)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        if need_weights:  # the remaining heads keep their attention patterns
            torch.testing.assert_close(w, w_ref[:, [0, 2]], rtol=1e-10, atol=1e-10)


def test_pruned_forward_unbatched_is_causal_and_gradients():
    torch.manual_seed(1)
    ref = nn.MultiheadAttention(8, 4, batch_first=True, dtype=torch.float64)
    _silence(ref, [0])
    pruned = nn.MultiheadAttention(8, 4, batch_first=True, dtype=torch.float64)
    pruned.load_state_dict(ref.state_dict())
    _cut(pruned, [0])
    x = torch.randn(6, 8, dtype=torch.float64)  # unbatched
    torch.testing.assert_close(pruned(x, x, x)[0], ref(x, x, x)[0], rtol=1e-10, atol=1e-10)
    xb = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    a = pruned(xb, xb, xb, attn_mask=mask, is_causal=True, need_weights=False)[0]
    b = ref(xb, xb, xb, attn_mask=mask, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    (ga,) = torch.autograd.grad(a.square().sum(), xb)
    (gb,) = torch.autograd.grad(b.square().sum(), xb)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="per-head masks must cover the remaining heads"):
        pruned(xb, xb, xb, attn_mask=torch.zeros(2 * 4, 6, 6, dtype=torch.float64))


def test_rollback_restores_the_plain_class_and_heads():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 4, batch_first=True)
    install_quantizers(mha)
    weight = mha.parametrizations.in_proj_weight.original
    edits = _cut(mha, [2])
    assert isinstance(mha, PrunedHeadsAttention) and mha.num_heads == 3 and not mha._qkv_same_embed_dim
    _rollback(mha, edits, [], [])
    assert not isinstance(mha, PrunedHeadsAttention) and isinstance(mha, nn.MultiheadAttention)
    assert mha.num_heads == 4 and mha._qkv_same_embed_dim
    assert mha.parametrizations.in_proj_weight.original is weight


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x, pad=None):
        h = self.enc(x, src_key_padding_mask=pad)
        if pad is None:
            return self.head(h.mean(1))
        # masked pooling: PyTorch's nested fast path (eval, padding mask) zeroes padded positions, the regular path
        # does not, so a model that pools padding would change outputs once that path is off
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def _kill(model: nn.Module, heads: list[int], mlp_fraction: float = 0.5) -> dict[str, int]:
    """Put the value rows of ``heads`` of every attention and a fraction of every MLP's hidden units at 0 bits."""
    killed = {}
    for layer in quantized_layers(model):
        b = layer.quantizer.b
        with torch.no_grad():
            if isinstance(layer.module, nn.MultiheadAttention):
                e, hd = layer.module.embed_dim, layer.module.head_dim
                for h in heads:
                    b[2 * e + h * hd : 2 * e + (h + 1) * hd] = -1.0
                    b[h * hd : h * hd + 1] = -1.0  # a dead query row too: still the same head
                killed[layer.name] = len(heads)
            elif layer.name.endswith(("linear1", "mlp.0")):
                b[: int(b.numel() * mlp_fraction)] = -1.0
                killed[layer.name] = int(b.numel() * mlp_fraction)
    return killed


def test_encoder_heads_and_mlp_units_removed_outputs_and_reloads_exact():
    torch.manual_seed(3)
    net = _Encoder().eval()
    install_quantizers(net)
    killed = _kill(net, [0, 2])
    x = torch.randn(4, 7, 16)
    pad = torch.zeros(4, 7, dtype=torch.bool)
    pad[1, -3:] = True
    with torch.no_grad():
        before = net(x, pad)
    params = sum(p.numel() for p in net.parameters())
    report = remove_dead_channels(net, ((x, pad), {}))
    assert report.heads_removed == {"enc.layers.0.self_attn": 2, "enc.layers.1.self_attn": 2}
    for name in ("enc.layers.0.linear1", "enc.layers.1.linear1"):
        assert report.removed[name] == killed[name]
    attn = net.enc.layers[0].self_attn
    assert isinstance(attn, PrunedHeadsAttention) and attn.num_heads == 2
    assert not net.enc.use_nested_tensor  # the nested fast path assumes full-width projections
    assert sum(p.numel() for p in net.parameters()) < params
    with torch.no_grad():  # eval + padding mask: the path that used nested tensors
        torch.testing.assert_close(net(x, pad), before, rtol=1e-5, atol=1e-6)
    # padded: a fresh full-size instance computes the same
    fresh = _Encoder().eval()
    fresh.load_state_dict(padded_state_dict(net))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, pad), before, rtol=1e-5, atol=1e-6)
    assert type(fresh.enc.layers[0].self_attn) is nn.MultiheadAttention
    # compact: a fresh instance resized to the pruned state dict
    compact = _Encoder().eval()
    state = effective_state_dict(net)
    resize_to_state_dict(compact, state)
    compact.load_state_dict(state)
    assert isinstance(compact.enc.layers[1].self_attn, PrunedHeadsAttention)
    assert not compact.enc.use_nested_tensor
    with torch.no_grad():
        torch.testing.assert_close(compact(x, pad), before, rtol=1e-5, atol=1e-6)
    # and back to full size: the class and the nested fast path return
    resize_to_state_dict(compact, padded_state_dict(net))
    assert type(compact.enc.layers[1].self_attn) is nn.MultiheadAttention and compact.enc.use_nested_tensor


def test_live_head_with_dead_rows_is_reported_not_removed():
    torch.manual_seed(4)
    net = _Encoder().eval()
    layers = {layer.name: layer for layer in install_quantizers(net)}
    with torch.no_grad():
        layers["enc.layers.0.self_attn"].quantizer.b[:4] = -1.0  # every query row of head 0: it still outputs
    report = remove_dead_channels(net, ((torch.randn(2, 5, 16),), {}))
    assert "no head has all its value rows at 0 bits" in report.rejected["enc.layers.0.self_attn"]
    attn = net.enc.layers[0].self_attn
    assert not isinstance(attn, PrunedHeadsAttention) and attn.in_proj_weight.shape == (48, 16)


def test_vit_and_lightning_demo_transformer_heads_removed():
    torchvision = pytest.importorskip("torchvision")
    from lightning.pytorch.demos.transformer import Transformer

    torch.manual_seed(5)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()
    vit_layers = {layer.name: layer for layer in install_quantizers(vit)}
    _kill(vit, [1, 3])
    with torch.no_grad():
        vit_layers["conv_proj"].quantizer.b[:2] = -1.0  # the residual stream: coupled with the positional embedding
    x = torch.randn(2, 3, 16, 16)
    report = remove_dead_channels(vit, x)
    assert set(report.heads_removed.values()) == {2} and len(report.heads_removed) == 2
    assert "encoder.pos_embedding" in report.rejected["conv_proj"]
    fresh = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()
    fresh.load_state_dict(padded_state_dict(vit))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), vit(x), rtol=1e-5, atol=1e-6)

    demo = Transformer(vocab_size=30, ninp=16, nhead=4, nhid=32, nlayers=1, dropout=0.0).eval()
    install_quantizers(demo)
    _kill(demo, [0])
    tokens = torch.randint(0, 30, (2, 6))
    with torch.no_grad():
        before = demo(tokens, tokens)
    report = remove_dead_channels(demo, (tokens, tokens))
    # encoder self-attention, decoder self-attention and cross-attention
    assert report.heads_removed == {
        "transformer.encoder.layers.0.self_attn": 1,
        "transformer.decoder.layers.0.self_attn": 1,
        "transformer.decoder.layers.0.multihead_attn": 1,
    }
    with torch.no_grad():
        torch.testing.assert_close(demo(tokens, tokens), before, rtol=1e-5, atol=1e-5)


def test_settle_encoders_keeps_the_users_choice():
    net = _Encoder()
    net.enc.use_nested_tensor = False
    _cut(net.enc.layers[0].self_attn, [0])
    settle_encoders(net)
    assert net.enc.use_nested_tensor is False
    resize_to_state_dict(net, padded_state_dict(net))
    assert net.enc.use_nested_tensor is False


def test_every_head_dead_all_removed_output_is_the_bias():
    torch.manual_seed(6)
    net = _Encoder().eval()
    install_quantizers(net)
    _kill(net, [0, 1, 2, 3], mlp_fraction=0.0)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = net(x)
    report = remove_dead_channels(net, ((x,), {}))
    assert report.heads_removed == {"enc.layers.0.self_attn": 4, "enc.layers.1.self_attn": 4}
    attn = net.enc.layers[0].self_attn
    assert attn.num_heads == 0 and attn.in_proj_weight.shape == (0, 16) and attn.out_proj.weight.shape == (16, 0)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
        out, weights = attn(x, x, x, need_weights=True)
    torch.testing.assert_close(out, attn.out_proj.bias.expand_as(out))
    assert weights.shape == (2, 5, 5) and not weights.any()
    fresh = _Encoder().eval()
    fresh.load_state_dict(padded_state_dict(net))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), before, rtol=1e-5, atol=1e-6)


def test_self_compression_removes_heads_while_training_and_the_export_reloads_exactly(tmp_path):
    """End to end on the names task: γ = 1 drives whole heads and MLP units to 0 bits; they are removed during
    training (the optimizer state follows), the statistics add up, the packed file reloads into a fresh full-size
    CharTransformer with the same outputs, and the Lightning checkpoint of the pruned model loads the Lightning way."""
    from helpers import quiet_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_xai import SelfCompression
    from lightning_xai.data import NamesDataModule
    from lightning_xai.models import ImageClassifier
    from lightning_xai.models.char_transformer import CharTransformer
    from lightning_xai.quantization.export import load_compressed

    torch.manual_seed(0)
    dm = NamesDataModule(batch_size=64)
    module = ImageClassifier(CharTransformer(num_classes=2, dim=16, heads=4, depth=2), num_classes=2)
    export = tmp_path / "names.safetensors"
    sc = SelfCompression(
        gamma=1.0, init_bits=3.0, freeze_bits_after=1.0, remove_every_n_steps=4, log_every_n_steps=0,
        export_path=str(export),
    )  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(tmp_path, [sc, ckpt], max_epochs=1, limit_train_batches=16).fit(module, datamodule=dm)
    stats = sc.removal_stats()
    assert stats["heads_removed"] >= 4 and stats["heads_removed"] == stats["dead_heads"]
    assert stats["removed_channels"] == sum(stats["removed_per_layer"].values()) > 0
    assert any(n.endswith("mlp.0") for n in stats["removed_per_layer"])  # MLP hidden units went too
    attn = module.net.blocks[0].attn
    assert attn.num_heads < 4 and attn.in_proj_weight.shape[0] == 3 * 4 * attn.num_heads
    x = dm.dataset("test").tensors[0][:32]
    module.eval()
    with torch.no_grad():
        expected = module(x)
        fresh = load_compressed(export, CharTransformer(num_classes=2, dim=16, heads=4, depth=2)).eval()
        torch.testing.assert_close(fresh(x), expected, rtol=1e-4, atol=1e-5)
        reloaded = ImageClassifier.load_from_checkpoint(
            ckpt.last_model_path, net=CharTransformer(num_classes=2, dim=16, heads=4, depth=2)
        ).eval()
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-4, atol=1e-5)


def test_units_and_heads_feeding_only_silent_layers_are_idle_and_removed():
    """A transformer MLP whose second layer died entirely has hidden units that contribute nothing (idle); an
    attention whose out_proj died has idle heads. Both are removed though not at 0 bits, and reported as idle."""
    torch.manual_seed(8)
    net = _Encoder().eval()
    layers = {layer.name: layer for layer in install_quantizers(net)}
    with torch.no_grad():
        layers["enc.layers.0.linear2"].quantizer.b[:] = -1.0  # the whole feed-forward output of block 0
        layers["enc.layers.1.self_attn.out_proj"].quantizer.b[:] = -1.0  # the whole attention output of block 1
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        before = net(x)
    report = remove_dead_channels(net, ((x,), {}))
    assert report.idle["enc.layers.0.linear1"] == 31  # one hidden unit stays so the shapes stay valid
    assert report.heads_removed == {"enc.layers.1.self_attn": 4}
    assert report.idle["enc.layers.1.self_attn"] == 48
    # its consumer is alive: not idle, not even tried (a wrong idle claim would be caught by the output check and
    # show up as a rejection)
    assert "enc.layers.1.linear1" not in report.removed and "enc.layers.1.linear1" not in report.rejected
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
    fresh = _Encoder().eval()
    fresh.load_state_dict(padded_state_dict(net))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), before, rtol=1e-5, atol=1e-6)
    # a producer protected (the guard may restore it) is not idle
    net2 = _Encoder().eval()
    layers2 = {layer.name: layer for layer in install_quantizers(net2)}
    with torch.no_grad():
        layers2["enc.layers.0.linear2"].quantizer.b[:] = -1.0
    report2 = remove_dead_channels(net2, ((x,), {}), protect={"enc.layers.0.linear2": [0]})
    assert "enc.layers.0.linear1" not in report2.removed
