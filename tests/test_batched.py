"""The batched quantization (all layers in one autograd node per forward) against the per-layer quantizer.

Reference: :func:`lightning_xai.quantization.ste.quantize` layer by layer (itself checked against the paper's formula
and finite differences in ``test_ste.py``), reached through ``per_layer_quantization()``.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from lightning_xai.models.nets import LeNet, SmallResNet
from lightning_xai.quantization import batched
from lightning_xai.quantization.batched import batched_quantize, per_layer_quantization
from lightning_xai.quantization.engine import SelfCompressor
from lightning_xai.quantization.install import gate_following_batchnorms, paired_gates, quantized_layers
from lightning_xai.quantization.quantizer import SERVED
from lightning_xai.quantization.ste import quantize

_ALIVE: list = []  # the compressors own the batching; keep them alive for the whole test


@pytest.fixture(autouse=True)
def _batch_on_cpu(monkeypatch):
    """The library batches only on accelerators; these tests run the batched maths on the CPU."""
    monkeypatch.setattr(batched, "BATCH_ON_CPU", True)


def test_cpu_models_keep_the_per_layer_path_by_default(monkeypatch):
    monkeypatch.setattr(batched, "BATCH_ON_CPU", False)
    net = _model(LeNet)
    net(torch.randn(2, 1, 8, 8))
    assert all(SERVED.get(layer.quantizer) is None for layer in quantized_layers(net))


def _model(cls=SmallResNet, seed=0):
    torch.manual_seed(seed)
    net = cls()
    compressor = SelfCompressor(gamma=0.1)
    compressor.install(net)
    _ALIVE.append(compressor)
    in_shape = (1, 1, 16, 16) if cls is SmallResNet else (1, 1, 8, 8)
    assert gate_following_batchnorms(net, torch.zeros(in_shape)) or cls is LeNet  # BN gates folded into γ/β
    g = torch.Generator().manual_seed(seed)
    for layer in quantized_layers(net):  # varied bit depths: 0-bit, fractional, wide channels
        b = layer.quantizer.b
        with torch.no_grad():
            b.copy_(torch.rand(b.shape, generator=g) * 9 - 1)
    return net


def _grads(net, x, per_layer):
    net.zero_grad(set_to_none=True)
    if per_layer:
        with per_layer_quantization():
            out = net(x)
    else:
        out = net(x)
    (out.square().sum() + out.sum()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls", [SmallResNet, LeNet])
def test_batched_equals_per_layer_forward_and_backward(cls):
    net = _model(cls)
    x = torch.randn(4, *((1, 16, 16) if cls is SmallResNet else (1, 8, 8)), generator=torch.Generator().manual_seed(1))
    out_b, grads_b = _grads(net, x, per_layer=False)
    out_l, grads_l = _grads(net, x, per_layer=True)
    torch.testing.assert_close(out_b, out_l, rtol=0, atol=0)  # the same quantized weights, bit for bit
    assert grads_b.keys() == grads_l.keys()
    assert any(n.endswith(".b") for n in grads_b) and any(n.endswith(".e") for n in grads_b)
    for name in grads_b:
        # weights, γ, β, biases: the same masked gradient; b/e: the same sums in another order
        torch.testing.assert_close(grads_b[name], grads_l[name], rtol=1e-5, atol=1e-6, msg=name)
    # the gates were served from the batch, and they did mask something
    gates = paired_gates(quantized_layers(net))
    assert gates and all(SERVED.get(gate) is not None for gate, _, _ in gates)
    assert any(bool((q.b <= 0).any()) for _, _, q in gates)


def test_batched_quantize_matches_the_per_layer_function_on_mixed_shapes_and_dtypes():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 3, 3, 3), (5, 7), (4,), (1, 0)]
    for dtype in (torch.float32, torch.bfloat16):
        ws = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
        bs = [(torch.rand(s[0], generator=g) * 9 - 1).requires_grad_() for s in shapes]
        es = [torch.full((s[0],), -3.0, requires_grad=True) for s in shapes]
        outs = batched_quantize(ws, bs, es)
        refs = [quantize(w, b, e) for w, b, e in zip(ws, bs, es)]
        for o, r in zip(outs, refs):
            assert o.dtype == r.dtype == dtype and o.shape == r.shape
            torch.testing.assert_close(o, r, rtol=0, atol=0)
        gs = [torch.randn(o.shape, generator=g).to(dtype) for o in outs]
        got = torch.autograd.grad(outs, ws + bs + es, gs, allow_unused=True)
        want = torch.autograd.grad(refs, ws + bs + es, gs, allow_unused=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_batched_step_dispatches_far_fewer_ops_than_layer_by_layer():
    """The point of batching: a ResNet's forward + backward runs a constant number of quantizer ops, not ~25 per
    layer (the GPU step time follows the launches)."""
    net = _model(SmallResNet)
    x = torch.randn(2, 1, 16, 16)
    layers = len(quantized_layers(net))
    counts = {}
    for per_layer in (False, True):
        _grads(net, x, per_layer)  # warm-up (index built once)
        with _Counter() as c:
            _grads(net, x, per_layer)
        counts[per_layer] = c.n
    assert layers >= 8
    assert counts[True] - counts[False] >= 10 * layers, counts


def test_activation_checkpointing_replays_the_served_weights():
    """A checkpointed block recomputes its layers inside the backward; they must get the very tensors of the forward
    (non-reentrant checkpointing checks that the recomputation saves the same tensors)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(checkpoint(self.a, x, use_reentrant=False))

    torch.manual_seed(0)
    net = Net()
    compressor = SelfCompressor()
    compressor.install(net)
    _ALIVE.append(compressor)
    x = torch.randn(5, 6)
    out_b, grads_b = _grads(net, x, per_layer=False)
    out_l, grads_l = _grads(net, x, per_layer=True)
    torch.testing.assert_close(out_b, out_l, rtol=0, atol=0)
    for name in grads_l:
        torch.testing.assert_close(grads_b[name], grads_l[name], rtol=1e-5, atol=1e-6, msg=name)


def test_slices_are_served_only_to_the_forward_that_computed_them():
    net = _model(LeNet)
    x = torch.randn(2, 1, 8, 8)
    net(x)
    layer = quantized_layers(net)[0]
    assert SERVED.get(layer.quantizer) is not None
    served = SERVED[layer.quantizer][0]
    # after the forward, reading the weight recomputes it (it may have changed since)
    assert layer.module.weight is not served
    torch.testing.assert_close(layer.module.weight, served, rtol=0, atol=0)
    with torch.no_grad():
        layer.quantizer.b.fill_(-1.0)  # every channel to 0 bits
    assert float(layer.module.weight.abs().sum()) == 0.0


def test_deep_copies_quantize_their_own_weights():
    net = _model(LeNet)
    x = torch.randn(3, 1, 8, 8)
    net(x).sum().backward()
    twin = copy.deepcopy(net)  # served slices live outside the modules: nothing with a graph is copied
    with torch.no_grad():
        for layer in quantized_layers(twin):
            layer.original.mul_(0.5)
    torch.testing.assert_close(twin(x), _reference(twin, x), rtol=0, atol=0)
    torch.testing.assert_close(net(x), _reference(net, x), rtol=0, atol=0)


def _reference(net, x):
    with per_layer_quantization(), torch.no_grad():
        return net(x)


def test_dependency_tracing_sees_the_layers_not_the_batch():
    """torch-pruning follows the autograd graph from the output: through one batched node every layer would look
    coupled to every other. Removal and C-SWAP's units must find the same structure as without batching."""
    from lightning_xai.pruning.surgery import remove_dead_channels
    from lightning_xai.pruning.units import find_units

    net = _model(SmallResNet)
    x = torch.randn(2, 1, 16, 16)
    units, _ = find_units(net, x)
    monkeypatch_off = pytest.MonkeyPatch()
    monkeypatch_off.setattr(batched, "BATCH_ON_CPU", False)
    try:
        reference_units, _ = find_units(net, x)
    finally:
        monkeypatch_off.undo()
    assert [(u.name, u.size) for u in units] == [(u.name, u.size) for u in reference_units]
    before = sum(p.numel() for p in net.parameters())
    report = remove_dead_channels(net, x, [])
    assert report.removed, report.rejected  # dead channels physically removed, outputs checked unchanged
    assert sum(p.numel() for p in net.parameters()) < before


def test_training_with_the_batched_path_removes_exports_and_reloads_exactly(tmp_path):
    """The GPU's path end to end (forced on the CPU): SelfCompression with removal during training and the guard;
    the slices were served, channels were removed, and the packed file reloads to the same outputs. (The whole
    suite also runs this way with ``LXAI_BATCH_ON_CPU=1``.)"""
    from helpers import quiet_trainer

    from lightning_xai import DigitsDataModule, PreservationGuard, SelfCompression, load_compressed
    from lightning_xai.models import ImageClassifier

    served, gates_stale = [], []
    original = batched.BatchedQuantization.quantize_all

    def spy(self):
        original(self)
        live = self._live()
        served.append(sum(SERVED.get(q) is not None for _, q, _ in live))
        # every gate of the current layers is served from the gate's current tensor (the cached list of gates is
        # looked up again after removals, which replace the tensors)
        pairs = paired_gates([layer for layer, _, _ in live])
        gates_stale.append(sum(SERVED.get(g) is None or SERVED[g][1] is not t for g, t, _ in pairs) if pairs else None)

    mp = pytest.MonkeyPatch()
    mp.setattr(batched.BatchedQuantization, "quantize_all", spy)
    try:
        torch.manual_seed(0)
        model = ImageClassifier(SmallResNet(1, 10, width=8))
        export = tmp_path / "sc.safetensors"
        sc = SelfCompression(gamma=0.5, remove_every_n_steps=10, log_every_n_steps=0, export_path=str(export))
        guard = PreservationGuard(fraction=0.1, check_every_n_steps=10, cooldown_steps=10)
        quiet_trainer(tmp_path, [sc, guard], max_epochs=2).fit(model, DigitsDataModule())
    finally:
        mp.undo()
    assert served and max(served) == len(quantized_layers(model))  # every layer took its slice from the batch
    assert sc.channels_removed > 0
    checked = [n for n in gates_stale if n is not None]
    assert len(checked) > 30 and not any(checked), gates_stale
    fresh = load_compressed(export, ImageClassifier(SmallResNet(1, 10, width=8)))
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)


def test_compiled_layers_keep_their_compiled_path_on_the_cpu():
    """``compile=True`` is the CPU's fusion: with batching allowed on the CPU, compiled layers are still left to it
    (on accelerators the batch serves them)."""
    net = LeNet()
    compressor = SelfCompressor(compile=True)
    compressor.install(net)
    _ALIVE.append(compressor)
    compressor._batched.quantize_all()  # what the forward pre-hook does, without running the compiled forward
    assert all(SERVED.get(layer.quantizer) is None for layer in quantized_layers(net))
    plain = _model(LeNet)
    _ALIVE[-1]._batched.quantize_all()
    assert all(SERVED.get(layer.quantizer) is not None for layer in quantized_layers(plain))


@pytest.mark.parametrize("batch", [False, True], ids=["per_layer", "batched"])
def test_channels_last_models_quantize_in_their_layout(monkeypatch, batch):
    """A channels_last model (the usual layout for AMP on GPUs) gets the same quantized outputs and gradients as the
    contiguous one, and its quantized weights and weight gradients stay channels_last, so its convolutions convert
    neither (per-layer path and the GPU's batched path, both on the CPU here)."""

    def channels_last(t):
        return t.is_contiguous(memory_format=torch.channels_last)

    monkeypatch.setattr(batched, "BATCH_ON_CPU", batch)
    ref, net = _model(SmallResNet), _model(SmallResNet)
    net.to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out, grads = _grads(net, x.contiguous(memory_format=torch.channels_last), per_layer=False)
    out_ref, grads_ref = _grads(ref, x, per_layer=False)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    convs = [layer for layer in quantized_layers(net) if layer.original.dim() == 4]
    assert len(convs) > 3
    cl_grads = [name for name, g in grads.items() if g.dim() == 4]
    lost = [n for n in cl_grads if not channels_last(grads[n])]
    assert cl_grads and not lost, f"weight gradients lost the layout: {lost}"
    if batch:
        served = [SERVED.get(layer.quantizer) for layer in convs]
        assert all(s is not None for s in served)
        assert all(channels_last(s[0]) for s in served), "the batch served contiguous weights"
    assert all(channels_last(layer.original) for layer in convs)
    weights = [getattr(layer.module, layer.tensor) for layer in convs]  # the per-layer quantizer, outside a forward
    assert all(channels_last(w) for w in weights), "the per-layer quantizer returned contiguous weights"


def test_a_channels_last_model_trains_removes_exports_and_reloads_exactly(tmp_path, monkeypatch):
    """SelfCompression end to end on a channels_last model (default CPU path): channels removed during training, the
    layers still channels_last after the removals, the packed file reloads into a fresh model (contiguous, or
    channels_last, which it keeps) with the same outputs."""
    from helpers import quiet_trainer

    from lightning_xai import DigitsDataModule, SelfCompression, load_compressed
    from lightning_xai.models import ImageClassifier

    monkeypatch.setattr(batched, "BATCH_ON_CPU", False)
    torch.manual_seed(0)
    model = ImageClassifier(SmallResNet(1, 10, width=8)).to(memory_format=torch.channels_last)
    export = tmp_path / "sc.safetensors"
    sc = SelfCompression(gamma=0.5, remove_every_n_steps=10, log_every_n_steps=0, export_path=str(export))
    quiet_trainer(tmp_path, [sc], max_epochs=2).fit(model, DigitsDataModule())
    assert sc.channels_removed > 0
    convs = [q.original for q in quantized_layers(model) if q.original.dim() == 4]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # removals keep it
    fresh = load_compressed(export, ImageClassifier(SmallResNet(1, 10, width=8)))
    cl = load_compressed(export, ImageClassifier(SmallResNet(1, 10, width=8)).to(memory_format=torch.channels_last))
    reloaded = [p for p in cl.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in reloaded)  # a reload keeps it too
    x = torch.randn(4, 1, 8, 8)
    for net in (model, fresh, cl):
        net.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cl(x), model(x), rtol=1e-5, atol=1e-5)


class _OddNet(nn.Module):
    """Layers whose sizes are no multiple of 4 (27, 135 and 35 weights; 3 and 5 channels), so that unpadded slices
    of the concatenations would start at unaligned addresses."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2, self.n2 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 7)

    def forward(self, x):
        x = self.n1(self.c1(x)).relu()
        x = self.n2(self.c2(x)).relu()
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_served_slices_and_weight_gradients_start_at_aligned_addresses(layout):
    """Every slice the batch serves (quantized weights, batch-norm and bias gates) and every weight gradient it
    returns starts at a 16-byte aligned address: CUDA kernels that load parameters with vector instructions fault
    on anything less (an H200 run of channels_last batch norm under 16-mixed died with "misaligned address")."""
    torch.manual_seed(0)
    net = _OddNet().to(memory_format=layout)
    compressor = SelfCompressor(gamma=0.1)
    compressor.install(net)
    _ALIVE.append(compressor)
    x = torch.randn(2, 1, 6, 6).contiguous(memory_format=layout)
    assert gate_following_batchnorms(net, x)
    served = []

    def grab(module, args, output):
        box = compressor._batched._box[0]
        served.extend((repr(key), value[0]) for key, value in SERVED.items() if value[-1] is box)

    net.register_forward_hook(grab)
    net(x).square().sum().backward()
    assert len(served) >= 3 + 4, [name for name, _ in served]  # three weights, the batch norms' weights and biases
    misaligned = [name for name, t in served if t.data_ptr() % 16]
    misaligned += [name for name, p in net.named_parameters() if p.grad is not None and p.grad.data_ptr() % 16]
    assert not misaligned, misaligned
