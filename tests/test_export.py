"""Packed export: exact reload, honest byte accounting, safe loading, atomic writes."""

import os

import numpy as np
import pytest
import torch
from helpers import kill_channels
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lightning_xai.models import MLP, LeNet, SmallResNet
from lightning_xai.pruning.surgery import remove_dead_channels
from lightning_xai.quantization import export as export_mod
from lightning_xai.quantization.export import (
    export_compressed,
    load_compressed,
    pack_codes,
    read_compressed,
    unpack_codes,
)
from lightning_xai.quantization.install import gate_batchnorm, install_quantizers, quantized_layers
from lightning_xai.quantization.size import size_report

_TENSOR_NAMES = ("lxai.packed", "lxai.bits", "lxai.exponents", "lxai.bias", "lxai.bias_flags")


def _random_bits(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quantized_layers(net):
            b = layer.quantizer.b
            b.copy_(torch.rand(b.shape, generator=gen) * 6)
            b[torch.rand(b.shape, generator=gen) < 0.25] = 0.0
            layer.quantizer.e.add_(torch.rand(b.shape, generator=gen))


def _payload_bytes(path):
    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


@pytest.mark.parametrize(
    ("factory", "shape"),
    [(LeNet, (5, 1, 8, 8)), (lambda: MLP(64, 10, 32), (5, 64)), (lambda: SmallResNet(width=4), (5, 1, 8, 8))],
)
def test_export_reload_identical_outputs_and_size_matches_accounting(tmp_path, factory, shape):
    torch.manual_seed(0)
    net = factory()
    layers = install_quantizers(net)
    for name, module in net.named_modules():  # gate BNs that follow quantized convs (as the callback does)
        if name.endswith("bn1") or name.endswith("bn2"):
            gate_batchnorm(module, next(q for q in layers if q.name == name.replace("bn", "conv")).quantizer)
    _random_bits(net)
    x = torch.randn(shape)
    net.train()
    net(x)  # move BN statistics
    net.eval()
    path = tmp_path / "m.safetensors"
    nbytes = export_compressed(net, path, coding="bits")
    assert nbytes == os.path.getsize(path)
    fresh = factory()
    load_compressed(path, fresh)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))
    report = size_report(net)
    payload = _payload_bytes(path)
    # tensor payload = the accounting (flag bits padded per file, not per layer)
    assert payload == report.total_bytes
    # everything else is the safetensors header (JSON), small and bounded
    assert os.path.getsize(path) - payload < 400 + 120 * len(list(net.state_dict()))


def test_export_after_removal_is_smaller_and_reloads(tmp_path):
    net = LeNet()
    layers = install_quantizers(net)
    kill_channels(layers[1], range(0, 60))
    kill_channels(layers[3], range(0, 100))
    x = torch.randn(4, 1, 8, 8)
    p1, p2 = tmp_path / "before.safetensors", tmp_path / "after.safetensors"
    before = export_compressed(net, p1)
    remove_dead_channels(net, x)
    after = export_compressed(net, p2)
    assert after < before
    fresh = load_compressed(p2, LeNet())
    assert fresh.features[2].out_channels == 4 and fresh.classifier[1].out_features == 28
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))


def test_file_is_smaller_than_float_by_the_bit_ratio(tmp_path):
    net = LeNet()
    install_quantizers(net, init_bits=4)
    torch.save(LeNet().state_dict(), tmp_path / "float.pt")
    export_compressed(net, tmp_path / "q.safetensors")
    ratio = os.path.getsize(tmp_path / "q.safetensors") / os.path.getsize(tmp_path / "float.pt")
    assert ratio < 0.15  # 4 of 32 bits plus per-channel exponents and float biases


@settings(max_examples=60, deadline=None)
@given(
    channels=st.integers(1, 6),
    per=st.integers(0, 9),
    widths=st.lists(st.integers(0, 16), min_size=6, max_size=6),
    seed=st.integers(0, 10_000),
)
def test_pack_unpack_roundtrip(channels, per, widths, seed):
    rng = np.random.default_rng(seed)
    k = np.array(widths[:channels], dtype=np.int64)
    codes = np.zeros((channels, per), dtype=np.int64)
    for c in range(channels):
        if k[c] > 0:
            codes[c] = rng.integers(-(2 ** (k[c] - 1)), 2 ** (k[c] - 1), size=per)
    stream = pack_codes(codes, k)
    assert stream.size == int((k * per).sum())
    packed = np.packbits(stream, bitorder="little")
    back = unpack_codes(np.unpackbits(packed, bitorder="little")[: stream.size], k, per)
    assert np.array_equal(back, codes)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 5), inp=st.integers(1, 5), seed=st.integers(0, 1000), bits=st.floats(0.0, 12.0))
def test_quantized_linear_export_property(tmp_path_factory, out, inp, seed, bits):
    torch.manual_seed(seed)
    net = torch.nn.Linear(inp, out)
    install_quantizers(net)
    with torch.no_grad():
        net.parametrizations.weight[0].b.fill_(bits)
    path = tmp_path_factory.mktemp("p") / "m.safetensors"
    export_compressed(net, path, coding="bits")
    fresh = load_compressed(path, torch.nn.Linear(inp, out))
    x = torch.randn(3, inp)
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))
    assert _payload_bytes(path) == size_report(net).total_bytes


def test_no_pickle_weights_only_loaders_read_it(tmp_path):
    net = LeNet()
    install_quantizers(net)
    path = tmp_path / "m.safetensors"
    export_compressed(net, path)
    tensors = load_file(str(path))
    assert set(_TENSOR_NAMES) <= set(tensors)
    assert "features.0.weight" not in tensors  # quantized weights live only in the packed stream


def test_truncated_or_tampered_file_gives_clear_error(tmp_path):
    net = LeNet()
    install_quantizers(net)
    path = tmp_path / "m.safetensors"
    export_compressed(net, path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_compressed(tmp_path / "trunc.safetensors")
    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_compressed(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_compressed(tmp_path / "missing.safetensors")


def test_plain_safetensors_without_metadata_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="has no lightning_xai metadata"):
        read_compressed(tmp_path / "plain.safetensors")


def test_interrupted_export_leaves_no_file(tmp_path, monkeypatch):
    net = LeNet()
    install_quantizers(net)
    path = tmp_path / "m.safetensors"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export_compressed(net, path)
    assert list(tmp_path.iterdir()) == []


def test_export_without_quantizers_and_load_into_quantized_model_are_errors(tmp_path):
    with pytest.raises(ValueError, match="has no quantizers installed"):
        export_compressed(LeNet(), tmp_path / "m.safetensors")
    net = LeNet()
    install_quantizers(net)
    export_compressed(net, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="must be a plain model without quantizers"):
        load_compressed(tmp_path / "m.safetensors", net)


# -- the "lzma" coding: entropy-coded codes -----------------------------------------------------------------------


def _peaked(net, bits=6.0, seed=0):
    """Trained-like weights: per channel, most codes near zero (Laplace), a few large."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quantized_layers(net):
            w = layer.original
            u = torch.rand(w.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
            w.copy_(-torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs()) * 0.01)
            layer.quantizer.b.fill_(bits)
            layer.quantizer.e.fill_(-8.0)
    return net


@pytest.mark.parametrize("factory", [LeNet, lambda: MLP(64, 10, 32), lambda: SmallResNet(width=4)])
@pytest.mark.parametrize("coding", ["lzma", "auto"])
def test_lzma_coding_reloads_exactly(tmp_path, factory, coding):
    torch.manual_seed(0)
    net = factory()
    install_quantizers(net)
    _random_bits(net)
    path = tmp_path / "m.safetensors"
    export_compressed(net, path, coding=coding)
    x = torch.randn((5, 64) if isinstance(net, MLP) else (5, 1, 8, 8))
    net.eval()
    fresh = load_compressed(path, factory()).eval()
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))


def test_auto_is_never_larger_than_bits_and_lzma_is_smaller_on_peaked_codes(tmp_path):
    net = LeNet()
    install_quantizers(net)
    _peaked(net)
    sizes = {c: export_compressed(net, tmp_path / f"{c}.safetensors", coding=c) for c in ("bits", "lzma", "auto")}
    assert sizes["auto"] == min(sizes["bits"], sizes["lzma"])
    # Laplace codes (scale 2.56 steps) carry about log2(2e * 2.56) = 3.8 bits each, the bit stream spends 5-6: the
    # coded stream must come within 10 % of the codes' empirical (order-0) entropy
    from lightning_xai.quantization.ste import quantize_to_int

    entropy_bits = 0.0
    for layer in quantized_layers(net):
        codes, _ = quantize_to_int(layer.original.detach(), layer.quantizer.b.detach(), layer.quantizer.e.detach())
        _, counts = np.unique(codes.numpy(), return_counts=True)
        entropy_bits -= float((counts * np.log2(counts / counts.sum())).sum())
    stored = {c: load_file(str(tmp_path / f"{c}.safetensors"))["lxai.packed"].numel() for c in ("bits", "lzma")}
    assert stored["lzma"] < 1.1 * entropy_bits / 8 < 0.8 * stored["bits"]
    assert read_compressed(tmp_path / "auto.safetensors")[1]["format"] == "lightning_xai.packed/3"
    # codes with no structure (uniform over the full width): LZMA cannot win, auto keeps the bit stream
    with torch.no_grad():
        for layer in quantized_layers(net):
            layer.original.uniform_(-0.03, 0.03)
            layer.quantizer.e.fill_(-12.0)
            layer.quantizer.b.fill_(9.0)
    sizes = {c: export_compressed(net, tmp_path / f"u{c}.safetensors", coding=c) for c in ("bits", "lzma", "auto")}
    assert sizes["auto"] == sizes["bits"] < sizes["lzma"]
    assert read_compressed(tmp_path / "uauto.safetensors")[1]["format"] == "lightning_xai.packed/2"


def test_lzma_payload_decodes_with_the_standard_library_to_the_quantizer_codes(tmp_path):
    """Independent reference: xz-decompress the stored bytes by hand and compare with quantize_to_int's codes."""
    import lzma

    from lightning_xai.quantization.ste import bits_needed, quantize_to_int

    net = LeNet()
    install_quantizers(net)
    _peaked(net)
    with torch.no_grad():  # some channels at 0 bits, one at 12 bits (two bytes per code)
        layers = quantized_layers(net)
        layers[0].quantizer.b[:2] = 0.0
        layers[1].quantizer.b[0] = 12.0
        layers[1].original[0].view(-1)[0] = 7.0  # code 1792 at e = -8: 12 bits
    path = tmp_path / "m.safetensors"
    export_compressed(net, path, coding="lzma")
    _, meta = read_compressed(path)
    assert meta["code_bytes"] == 2
    raw = np.frombuffer(lzma.decompress(load_file(str(path))["lxai.packed"].numpy().tobytes()), dtype="<u2")
    expected = []
    for layer in layers:
        q = layer.quantizer
        codes, _ = quantize_to_int(layer.original.detach(), q.b.detach(), q.e.detach())
        k = bits_needed(codes)
        for row, kk in zip(codes.flatten(1), k):
            if kk > 0:  # zigzag, written out: 0, -1, 1, -2, 2 -> 0, 1, 2, 3, 4
                expected.append(torch.tensor([2 * v if v >= 0 else -2 * v - 1 for v in row.long().tolist()]))
    assert np.array_equal(raw, torch.cat(expected).numpy())


def test_damaged_lzma_stream_is_refused(tmp_path, monkeypatch):
    """Even with a matching checksum (a writer bug, not a flipped byte), a stream that does not fit the bit-width
    table is a clear error, never a silently wrong model."""
    import lzma

    net = LeNet()
    install_quantizers(net)
    _peaked(net)
    real = export_mod.lzma_codes

    def shorter(codes, widths):
        blob, nbytes = real(codes, widths)
        return lzma.compress(lzma.decompress(blob)[:-5], format=lzma.FORMAT_XZ), nbytes

    def longer(codes, widths):
        blob, nbytes = real(codes, widths)
        return lzma.compress(lzma.decompress(blob) + b"\0", format=lzma.FORMAT_XZ), nbytes

    def too_wide(codes, widths):
        blob, nbytes = real(codes, widths)
        return lzma.compress(b"\xff\xff" + lzma.decompress(blob)[2:], format=lzma.FORMAT_XZ), nbytes

    def garbage(codes, widths):
        return b"not xz at all", 1

    for fake, message in (
        (shorter, "too short"),
        (longer, "longer than"),
        (too_wide, "does not fit"),
        (garbage, "does not decode"),
    ):
        monkeypatch.setattr(export_mod, "lzma_codes", fake)
        path = tmp_path / f"{fake.__name__}.safetensors"
        export_compressed(net, path, coding="lzma")
        with pytest.raises(ValueError, match=f"is corrupted: .*{message}"):
            read_compressed(path)


@settings(max_examples=40, deadline=None)
@given(
    channels=st.integers(1, 5),
    inp=st.integers(1, 6),
    widths=st.lists(st.floats(0.0, 18.0), min_size=5, max_size=5),
    seed=st.integers(0, 10_000),
)
def test_lzma_and_bits_codings_reload_the_same_model(tmp_path_factory, channels, inp, widths, seed):
    torch.manual_seed(seed)
    net = torch.nn.Linear(inp, channels)
    install_quantizers(net)
    with torch.no_grad():
        net.parametrizations.weight[0].b.copy_(torch.tensor(widths[:channels]))
        net.parametrizations.weight[0].e.fill_(-14.0)
    d = tmp_path_factory.mktemp("c")
    export_compressed(net, d / "b.safetensors", coding="bits")
    export_compressed(net, d / "l.safetensors", coding="lzma")
    a, _ = read_compressed(d / "b.safetensors")
    b, meta = read_compressed(d / "l.safetensors")
    assert meta["format"] == "lightning_xai.packed/3"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
