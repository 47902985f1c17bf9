"""The quantizer against a naive per-element reference (float64) and against an autograd formulation."""

import math

import pytest
import torch

from lightning_xai.quantization.install import quantized_layers
from lightning_xai.quantization.ste import bits_needed, quantize, quantize_to_int


def naive(w, b, e):
    """Per-element loops with Python floats: forward and STE gradients of sum(g * q) for a given upstream g."""
    C = w.shape[0]
    flat = w.reshape(C, -1).tolist()
    q = []
    for c in range(C):
        bc = max(float(b[c]), 0.0)
        s = 2.0 ** float(e[c])
        lo, hi = -(2.0 ** (bc - 1)), 2.0 ** (bc - 1) - 1
        row = []
        for x in flat[c]:
            u = x / s
            row.append(s * round(min(max(u, lo), hi)))  # Python's round is half-to-even like torch.round
        q.append(row)
    return torch.tensor(q, dtype=torch.float64).reshape(w.shape)


def naive_grads(w, b, e, g):
    C = w.shape[0]
    W = w.reshape(C, -1).tolist()
    G = g.reshape(C, -1).tolist()
    gw = [[0.0] * len(W[0]) for _ in range(C)]
    gb, ge = [0.0] * C, [0.0] * C
    for c in range(C):
        bc = float(b[c])
        s = 2.0 ** float(e[c])
        half = 2.0 ** (max(bc, 0.0) - 1)
        lo, hi = -half, half - 1
        for i, x in enumerate(W[c]):
            u = x / s
            r = round(min(max(u, lo), hi))
            qv = s * r
            if lo <= u <= hi:
                gw[c][i] = G[c][i]
                ge[c] += G[c][i] * math.log(2) * (qv - x)
            else:
                ge[c] += G[c][i] * math.log(2) * qv
                if bc > 0:
                    sign = 1.0 if u > hi else -1.0
                    gb[c] += G[c][i] * sign * math.log(2) * s * half
    return (
        torch.tensor(gw, dtype=torch.float64).reshape(w.shape),
        torch.tensor(gb, dtype=torch.float64),
        torch.tensor(ge, dtype=torch.float64),
    )


def autograd_reference(w, b, e):
    """The textbook STE: x + (round(x) - x).detach(), clip bounds from relu(b)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    half = 2.0 ** (b.clamp(min=0) - 1)
    lo, hi = -half, half - 1
    s = (2.0**e).reshape(shape)
    u = torch.clamp(w / s, lo.reshape(shape), hi.reshape(shape))
    return s * (u + (torch.round(u) - u).detach())


SHAPES = [(3, 5), (4, 2, 3, 3), (2, 3, 4), (5, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_and_gradients_match_naive_loops(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    C = shape[0]
    w = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.7).requires_grad_()
    b = (torch.rand(C, generator=gen, dtype=torch.float64) * 6 - 1).requires_grad_()  # some b < 0
    e = (torch.rand(C, generator=gen, dtype=torch.float64) * 4 - 4).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    q = quantize(w, b, e)
    torch.testing.assert_close(q.detach(), naive(w.detach(), b.detach(), e.detach()), rtol=0, atol=1e-12)
    (q * g).sum().backward()
    gw, gb, ge = naive_grads(w.detach(), b.detach(), e.detach(), g)
    torch.testing.assert_close(w.grad, gw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, gb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e.grad, ge, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_detach_formulation(shape):
    C = shape[0]
    w1 = torch.randn(shape, dtype=torch.float64).requires_grad_()
    b1 = (torch.rand(C, dtype=torch.float64) * 5 + 0.5).requires_grad_()
    e1 = (torch.rand(C, dtype=torch.float64) * 3 - 4).requires_grad_()
    w2, b2, e2 = (t.detach().clone().requires_grad_() for t in (w1, b1, e1))
    g = torch.randn(shape, dtype=torch.float64)
    (quantize(w1, b1, e1) * g).sum().backward()
    (autograd_reference(w2, b2, e2) * g).sum().backward()
    for a, r in ((w1, w2), (b1, b2), (e1, e2)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-12)


def test_zero_bit_channels_are_exact_zeros():
    w = torch.randn(4, 3, 3, 3) * 10
    b = torch.tensor([0.0, -2.0, 3.0, 0.0])
    e = torch.tensor([-3.0, 1.0, -2.0, 5.0])
    q = quantize(w, b, e)
    assert torch.equal(q[[0, 1, 3]], torch.zeros(3, 3, 3, 3))
    assert not torch.signbit(q[[0, 1, 3]]).any()  # +0.0, not -0.0
    assert q[2].abs().sum() > 0


def test_quantize_to_int_reproduces_forward_exactly():
    w = torch.randn(6, 10)
    b = torch.rand(6) * 8
    e = torch.rand(6) * 4 - 6
    codes, s = quantize_to_int(w, b, e)
    assert torch.equal(codes, codes.round())
    assert torch.equal(quantize(w, b, e), s[:, None] * codes)


def test_bits_needed_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-40, 40, (50, 7), generator=gen).float()
    codes[3] = 0
    codes[4] = torch.tensor([-1, 0, -1, 0, 0, -1, 0]).float()
    k = bits_needed(codes)
    for c in range(50):
        vals = codes[c]
        if (vals == 0).all():
            assert k[c] == 0
            continue
        smallest = next(n for n in range(1, 33) if vals.min() >= -(2 ** (n - 1)) and vals.max() <= 2 ** (n - 1) - 1)
        assert k[c] == smallest


def test_codes_fit_in_ceil_of_b_bits():
    w = torch.randn(20, 30) * 3
    b = torch.rand(20) * 7 + 0.01
    e = torch.zeros(20) - 2
    codes, _ = quantize_to_int(w, b, e)
    assert (bits_needed(codes) <= torch.ceil(b).long()).all()


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`b` and `e` must have shape \(3,\)"):
        quantize(torch.randn(3, 4), torch.zeros(4), torch.zeros(3))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_quantizer_compiles_with_torch_compile_and_matches_eager(backend):
    """The quantizer is a plain custom autograd.Function of tensor ops: torch.compile traces it in one graph
    (``fullgraph=True``, forward and backward), and the compiled results equal eager ones (inductor fuses the
    elementwise passes into one kernel each way)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(6, 4, 3, 3, generator=gen) * 0.3).requires_grad_()
    b = (torch.rand(6, generator=gen) * 6 - 1).requires_grad_()
    e = torch.full((6,), -4.0).requires_grad_()
    g = torch.randn(6, 4, 3, 3, generator=gen)
    compiled = torch.compile(quantize, fullgraph=True, backend=backend)
    out = compiled(w, b, e)
    (out * g).sum().backward()
    grads = [t.grad.clone() for t in (w, b, e)]
    for t in (w, b, e):
        t.grad = None
    ref = quantize(w, b, e)
    (ref * g).sum().backward()
    assert torch.equal(out.detach(), ref.detach())
    for got, t in zip(grads, (w, b, e)):
        torch.testing.assert_close(got, t.grad, rtol=1e-6, atol=1e-7)


def test_self_compression_compile_option_matches_the_eager_quantizer():
    """``SelfCompression(compile=True)`` routes every quantizer through one torch.compile'd function (dynamic
    shapes); outputs and gradients equal the eager quantizer's."""
    import copy

    from lightning_xai.models import LeNet
    from lightning_xai.quantization.engine import SelfCompressor

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = LeNet()
    SelfCompressor(gamma=0.1).install(eager)
    compiled = copy.deepcopy(eager)
    SelfCompressor(gamma=0.1, compile=True).install(compiled)
    assert all(q.quantizer.compiled for q in quantized_layers(compiled))
    x = torch.randn(8, 1, 8, 8)
    for net in (eager, compiled):
        net(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


FUSED_SHAPES = [(8, 16, 6, 6), (70, 64)]  # ≥ _FUSE_MIN_NUMEL weights: the fused path takes them


def _float32_case(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    C = shape[0]
    w = (torch.randn(shape, generator=gen) * 0.7).requires_grad_()
    b = (torch.rand(C, generator=gen) * 6 - 1).requires_grad_()  # some channels at b < 0
    e = (torch.rand(C, generator=gen) * 4 - 4).requires_grad_()
    return w, b, e, torch.randn(shape, generator=gen)


@pytest.mark.parametrize("shape", FUSED_SHAPES)
def test_fused_cpu_kernels_match_the_naive_loops_and_the_eager_path(shape, monkeypatch):
    """``fused=True`` (what ``compile=True``/``"auto"`` set on the CPU) runs the torch.compile'd kernels, both ways:
    the forward equals the naive loops exactly, the gradients match them to float32 precision and match eager's."""
    from lightning_xai.quantization import ste

    calls = []
    run = ste._run_fused
    monkeypatch.setattr(ste, "_run_fused", lambda name, *a: calls.append(name) or run(name, *a))
    w, b, e, g = _float32_case(shape, 0)
    q = quantize(w, b, e, fused=True)
    (q * g).sum().backward()
    assert calls == ["forward", "backward"] and not ste._FUSED.get("broken")
    w64, b64, e64 = (t.detach().double() for t in (w, b, e))
    torch.testing.assert_close(q.detach().double(), naive(w64, b64, e64), rtol=1e-6, atol=1e-7)  # float32 2^e
    for got, ref in zip((w.grad, b.grad, e.grad), naive_grads(w64, b64, e64, g.double())):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    fused = [t.grad.clone() for t in (w, b, e)]
    for t in (w, b, e):
        t.grad = None
    ref = quantize(w, b, e)
    (ref * g).sum().backward()
    assert torch.equal(ref, q)
    for got, t in zip(fused, (w, b, e)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-6)


def test_fused_forward_is_bit_exact_over_many_ranges():
    """The fused kernels compute each channel's clamp range themselves from ``2^e`` and ``2^(b⁺−1)``, which the eager
    ``exp2`` supplies (a compiled ``exp2`` rounds differently: the quantized weights then differed in ~60 % of these
    cases): over fractional and integer bit depths and exponents, dead channels included, the fused forward equals
    the eager one bit for bit, and the weight gradients are equal too."""
    gen = torch.Generator().manual_seed(7)
    for case in range(12):
        C = int(torch.randint(2, 300, (), generator=gen))
        N = max(int(torch.randint(8, 200, (), generator=gen)), 4096 // C + 1)  # ≥ _FUSE_MIN_NUMEL: fused
        w = (torch.randn(C, N, generator=gen) * float(torch.rand((), generator=gen) * 2)).requires_grad_()
        b = torch.rand(C, generator=gen) * 12 - 2
        e = torch.rand(C, generator=gen) * 12 - 12
        b, e = (b.round() if case % 2 else b), (e.round() if case % 3 == 0 else e)
        b.requires_grad_(), e.requires_grad_()
        g = torch.randn(C, N, generator=gen)
        grads = []
        for fused in (True, False):
            q = quantize(w, b, e, fused=fused)
            (q * g).sum().backward()
            grads.append((q.detach(), w.grad, b.grad, e.grad))
            w.grad = b.grad = e.grad = None
        (qf, wf, bf, ef), (qe, we, be, ee) = grads
        assert torch.equal(qf, qe), case
        assert torch.equal(wf, we), case
        torch.testing.assert_close(bf, be, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ef, ee, rtol=1e-5, atol=1e-6)


def test_a_fused_forward_whose_backward_cannot_fuse_falls_back_to_the_eager_backward(monkeypatch):
    """The fused forward saves the kernels' ranges and ``b``'s gradient factor; when the backward cannot take the
    fused kernel (a compile that broke in between, compiled autograd tracing it, another gradient dtype), the eager
    backward runs from those saved tensors and gives the eager quantizer's gradients."""
    from lightning_xai.quantization import ste

    w, b, e, g = _float32_case(FUSED_SHAPES[1], 3)
    ref = quantize(w, b, e)
    (ref * g).sum().backward()
    expected = [t.grad.clone() for t in (w, b, e)]
    w.grad = b.grad = e.grad = None
    q = quantize(w, b, e, fused=True)
    monkeypatch.setitem(ste._FUSED, "broken", True)
    (q * g).sum().backward()
    assert torch.equal(q, ref)
    for got, want in zip((w.grad, b.grad, e.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_kernels_keep_a_channels_last_weight_in_its_layout(monkeypatch):
    """A channels_last weight goes through the fused kernels in its own layout (a view, no copy): its quantized
    weight and its gradient come back channels_last, with the values of the contiguous weight's eager path."""
    from lightning_xai.quantization import ste

    calls = []
    run = ste._run_fused
    monkeypatch.setattr(ste, "_run_fused", lambda name, *a: calls.append(name) or run(name, *a))
    w, b, e, g = _float32_case((8, 16, 6, 6), 1)
    cl = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    q = quantize(cl, b, e, fused=True)
    (q * g).sum().backward()
    assert calls == ["forward", "backward"] and not ste._FUSED.get("broken")
    assert q.is_contiguous(memory_format=torch.channels_last) and not q.is_contiguous()
    assert cl.grad.is_contiguous(memory_format=torch.channels_last)
    fused = [t.grad.clone() for t in (cl, b, e)]
    b.grad = e.grad = None
    ref = quantize(w, b, e)
    (ref * g).sum().backward()
    assert torch.equal(ref, q)
    for got, t in zip(fused, (w, b, e)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-6)


def test_layers_sharing_the_backward_workspace_keep_their_own_gradients():
    """The eager backward writes its temporaries into one reused CPU workspace: two layers quantized in one graph
    get the same gradients as each alone (a gradient that were a view of the workspace would be overwritten)."""
    cases = [_float32_case(shape, seed) for seed, shape in enumerate([(6, 4, 3, 3), (5, 40), (6, 4, 3, 3)])]
    alone = []
    for w, b, e, g in cases:
        (quantize(w, b, e) * g).sum().backward()
        alone.append([t.grad.clone() for t in (w, b, e)])
        for t in (w, b, e):
            t.grad = None
    sum((quantize(w, b, e) * g).sum() for w, b, e, g in cases).backward()
    for (w, b, e, _), ref in zip(cases, alone):
        for t, r in zip((w, b, e), ref):
            assert torch.equal(t.grad, r)


def test_a_failed_compile_warns_once_and_falls_back_to_the_eager_quantizer(monkeypatch):
    from lightning_xai.quantization import ste

    def no_toolchain(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(ste, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", no_toolchain)
    w, b, e, g = _float32_case(FUSED_SHAPES[1], 1)
    with pytest.warns(UserWarning, match="torch.compile of the quantizer failed.*no C\\+\\+ compiler"):
        q = quantize(w, b, e, fused=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        (q * g).sum().backward()
        assert torch.equal(quantize(w, b, e, fused=True), q)
    assert torch.equal(q, quantize(w, b, e))


def test_compile_auto_fuses_only_models_large_enough_to_repay_the_compilation():
    from lightning_xai.models import LeNet
    from lightning_xai.quantization.engine import AUTO_COMPILE_MIN_WEIGHTS, SelfCompressor

    big = torch.nn.Sequential(torch.nn.Linear(2048, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    assert sum(p.numel() for p in big.parameters() if p.dim() > 1) >= AUTO_COMPILE_MIN_WEIGHTS
    for model, setting, fused in [
        (big, "auto", True),
        (LeNet(), "auto", False),
        (big, False, False),
        (LeNet(), True, True),
    ]:
        SelfCompressor(compile=setting).install(model)
        assert [q.quantizer.compiled for q in quantized_layers(model)] == [fused] * len(quantized_layers(model))


def test_fused_kernels_compile_a_few_graphs_whatever_the_layer_shapes(monkeypatch):
    """Removal changes layers' shapes while training runs: the fused kernels are handed the weight rows as tensors of
    their own, so dynamo guards on the rows' (dynamic) shape only, not on the 4-D or 2-D weight they are a view of.
    Over conv and linear weights of many shapes, both layouts, the forward and the backward each stay at a few graphs
    (handed views, the backward needed a graph for nearly every kind of base, and ResNet-50 with removals reached
    dynamo's limit of 8). Counted with a backend that only counts, so nothing is compiled to C++ here."""
    from lightning_xai.quantization import ste

    graphs = {"forward": 0, "backward": 0}
    real_compile = torch.compile

    def counting_compile(fn, **kwargs):
        name = "forward" if fn is ste._forward_math else "backward"

        def backend(gm, example_inputs):
            graphs[name] += 1
            return gm.forward

        return real_compile(fn, backend=backend, **kwargs)

    torch._dynamo.reset()
    monkeypatch.setattr(ste, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", counting_compile)
    shapes = [(64, 64, 3, 3), (64, 64, 1, 1), (60, 64, 3, 3), (64, 60, 1, 1), (300, 784), (290, 700), (512, 1, 3, 3)]
    shapes += [(128, 256, 1, 1), (96, 48, 3, 3), (40, 3, 7, 7)]
    try:
        for seed, shape in enumerate(shapes):
            for cl in (False, True) if len(shape) == 4 else (False,):
                w, b, e, g = _float32_case(shape, seed)
                if cl:
                    w = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
                (quantize(w, b, e, fused=True) * g).sum().backward()
        assert not ste._FUSED.get("broken")
        assert graphs["forward"] <= 3 and graphs["backward"] <= 3, graphs
    finally:
        torch._dynamo.reset()
