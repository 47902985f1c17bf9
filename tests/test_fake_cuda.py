"""Device checks without a GPU: the data-independent parts of every callback run on *fake* CUDA tensors.

``FakeTensorMode`` + ``torch.device("cuda")`` builds models whose tensors claim to live on ``cuda:0``; every op
checks devices the way CUDA does (a non-scalar CPU tensor meeting a CUDA one raises), and any read of a value back
to the host (``.item()``, ``bool(t)``, data-dependent shapes) raises ``DataDependentOutputException``. So a passing
test here shows both: no tensor is created on the wrong device, and no host synchronisation happens in that code.

Covered: the quantizer forward and its backward (called directly), the batched quantizer's (all layers in one node),
parametrization install, bias and batch-norm
gates, the penalty and its vectorised gradient, the bit-depth optimizer step with AMP's unscale/non-finite check and
the fused Adam (through ``SelfCompression.on_before_optimizer_step``), physical slicing of channels with optimizer
state, plan application through channel masks, C-SWAP's channel contribution, the causal effect ξ and the scoring
function, LRP's batch-norm canonization (statistics a batch norm does not track), mixed-precision plans moved to the
device, and the guard's cool-down hold with CPU-stored masks (as after a resume).

Not covered here (they need real values or a CUDA runtime, and run in ``tests/test_cuda.py`` on a GPU and on the
CPU everywhere else): anything that runs the autograd engine (a full backward, LRP's vector-Jacobian products,
gradient × activation), CUDA generators (the guard's batch choice), and the steps that read values by design at
check, removal or analysis time (t-tests via scipy, output comparisons after removal, accuracy).
"""

import contextlib

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from lightning_xai import SelfCompression
from lightning_xai.attribution.causal import global_causal_effect, true_class_probability
from lightning_xai.attribution.lrp import canonized
from lightning_xai.callbacks.preservation_guard import PreservationGuard
from lightning_xai.models.nets import LeNet, SmallResNet
from lightning_xai.pruning.cswap import channel_contribution
from lightning_xai.pruning.surgery import ChannelCut, apply_cuts
from lightning_xai.pruning.units import ChannelMasker, PrunableUnit
from lightning_xai.quantization.engine import SelfCompressor
from lightning_xai.quantization.install import gate_following_batchnorms, quantized_layers
from lightning_xai.quantization.mixed import WeightPlan, _on
from lightning_xai.quantization.ste import _QuantizeSTE, bits_needed, quantize

CUDA = torch.device("cuda", 0)


@contextlib.contextmanager
def fake_cuda(real_inputs: bool = False):
    """Everything created inside lives on fake ``cuda:0``; real tensors from outside are refused unless
    ``real_inputs`` (CPU data that the code moves to the device, as after a broadcast or a checkpoint load)."""
    with FakeTensorMode(allow_non_fake_inputs=real_inputs), torch.device("cuda"):
        yield


class _Ctx:
    """Stands in for autograd's context so the custom backward can be called without the autograd engine."""

    needs_input_grad = (True, True, True)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_forward_and_backward_stay_on_the_device(shape, dtype):
    with fake_cuda():
        w = torch.randn(shape, dtype=dtype)
        b = torch.full((shape[0],), 4.0)  # b/e stay float32 under half precision
        e = torch.full((shape[0],), -3.0)
        out = quantize(w, b, e)
        assert out.device == CUDA and out.dtype == dtype and out.shape == w.shape
        ctx = _Ctx()
        _QuantizeSTE.forward(ctx, w, b, e)
        gw, gb, ge, _ = _QuantizeSTE.backward(ctx, torch.randn(shape, dtype=dtype))
        assert gw.device == gb.device == ge.device == CUDA
        assert gw.dtype == dtype and gb.dtype == ge.dtype == torch.float32
        assert bits_needed(torch.round(w.float())).device == CUDA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_quantizer_forward_and_backward_stay_on_the_device(dtype):
    """All layers in one node: the channel index, the range gather and the segment reduction on the device, with
    no host read (``segment_reduce(..., unsafe=True)`` checks nothing on the host)."""
    from lightning_xai.quantization.batched import _BatchedQuantizeSTE, _Meta
    from lightning_xai.quantization.quantizer import Serving

    shapes = [(6, 3, 3, 3), (5, 7), (4,)]
    with fake_cuda():
        ws = [torch.randn(s, dtype=dtype) for s in shapes]
        bs = [torch.full((s[0],), 4.0) for s in shapes]
        es = [torch.full((s[0],), -3.0) for s in shapes]
        meta = _Meta([w.shape for w in ws], ws[0].device)
        assert meta.segment.device == meta.lengths.device == CUDA
        ctx = _Ctx()
        ctx.needs_input_grad = (False, False) + (True,) * (3 * len(shapes))
        outs = _BatchedQuantizeSTE.forward(ctx, meta, Serving(), *ws, *bs, *es)
        assert [o.shape for o in outs] == [w.shape for w in ws]
        assert all(o.device == CUDA and o.dtype == dtype for o in outs)
        grads = _BatchedQuantizeSTE.backward(ctx, *[torch.randn(s, dtype=dtype) for s in shapes])
        assert grads[:2] == (None, None)
        gw, gb, ge = grads[2 : 2 + 3], grads[5:8], grads[8:]
        assert all(g.device == CUDA for g in (*gw, *gb, *ge))
        assert all(g.dtype == dtype for g in gw) and all(g.dtype == torch.float32 for g in (*gb, *ge))
        assert [g.shape for g in gb] == [(s[0],) for s in shapes]


@pytest.mark.parametrize("net_cls", [LeNet, SmallResNet])
def test_install_gates_and_quantized_forward_on_the_device(net_cls):
    with fake_cuda():
        net = net_cls()
        x = torch.randn(4, 1, 8, 8)
        compressor = SelfCompressor(gamma=0.1)
        layers = compressor.install(net)
        assert all(layer.quantizer.b.device == CUDA and layer.quantizer.b.dtype == torch.float32 for layer in layers)
        gate_following_batchnorms(net, x)
        with torch.no_grad():
            layers[0].quantizer.b[:2] = 0.0  # two dead channels: bias and batch-norm gates multiply by a device mask
        net.train()
        assert net(x).device == CUDA
        net.eval()
        assert net(x).device == CUDA


def test_penalty_gradient_and_bit_optimizer_step_on_the_device():
    """One ``on_before_optimizer_step`` of SelfCompression: unscale + non-finite check, penalty gradient, fused Adam —
    with a loss scale as AMP keeps it (a device tensor). Any host read would raise inside the fake mode."""
    with fake_cuda():
        net = SmallResNet()
        cb = SelfCompression(gamma=0.1)
        cb.compressor.install(net)
        terms = cb.compressor.penalty()
        assert terms.total.device == CUDA
        for p in cb.compressor.quant_parameters():
            p.grad = torch.randn_like(p)
        trainer = _StubTrainer(scale=torch.full((), 1024.0))
        cb.on_fit_start(trainer, net)  # type: ignore[arg-type]
        cb.on_before_optimizer_step(trainer, net, None)  # type: ignore[arg-type]
        state = cb.optimizer.state[cb.compressor.quant_parameters()[0]]
        assert state["exp_avg"].device == CUDA and state["step"].device == CUDA


class _Scaler:
    def __init__(self, scale):
        self._scale = scale


class _Plugin:
    def __init__(self, scale):
        self.scaler = None if scale is None else _Scaler(scale)


class _StubTrainer:
    """What the callback reads from a Trainer in these two hooks."""

    def __init__(self, scale=None):
        self.optimizers = []
        self.global_step = 1
        self.world_size = 1
        self.estimated_stepping_batches = 100
        self.precision_plugin = _Plugin(scale)


def test_physical_slicing_with_optimizer_state_on_the_device():
    with fake_cuda():
        net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3))
        SelfCompressor().install(net)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        cuts = [ChannelCut("0", "out", (1, 4)), ChannelCut("1", "out", (1, 4)), ChannelCut("3", "in", (1, 4))]
        apply_cuts(net, cuts, [opt])
        assert net[0].out_channels == 4 and net[3].in_channels == 4 and net[1].num_features == 4
        for p in net.parameters():
            assert p.device == CUDA
            assert all(v.device == CUDA for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim())
        assert net(torch.randn(2, 1, 8, 8)).device == CUDA


def test_channel_masks_and_contributions_on_the_device():
    with fake_cuda():
        net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        unit = PrunableUnit(
            index=0,
            name="0",
            size=6,
            position=2,
            producers=["0"],
            consumers=["2"],
            channel_cuts=[[ChannelCut("0", "out", (c,)), ChannelCut("2", "in", (c,))] for c in range(6)],
            magnitude=torch.zeros(6, device="cpu"),
            group_importance=torch.zeros(6, device="cpu"),
        )
        masker = ChannelMasker(net, [unit])
        masker.remove(0, [1, 3])
        x = torch.randn(5, 4)
        with masker.active():
            out = net(x)
            with masker.trial([[(0, 0)], [(0, 2)]]):
                batched = net(torch.cat([x, x]))
        assert out.device == batched.device == CUDA
        assert channel_contribution(net[2], torch.randn(5, 6), [0, 2]).device == CUDA
        sigma = true_class_probability(out, torch.tensor([0, 1, 2, 0, 1]))
        assert global_causal_effect(sigma, sigma[None].expand(3, -1)).device == CUDA


def test_lrp_canonization_and_mixed_precision_plans_on_the_device():
    with fake_cuda():
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU(), nn.Linear(4, 2))
        net.eval()
        with canonized(net):  # statistics the batch norm does not track default to identity, on its device
            assert net[0].bias.device == CUDA
    plan = WeightPlan(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool), 8, 4)  # broadcast: CPU
    with fake_cuda(real_inputs=True):
        moved = _on(plan, CUDA)
        assert moved.keep.device == moved.high.device == CUDA


def test_guard_cooldown_hold_with_masks_from_a_checkpoint():
    """After a resume the guard's stored masks are CPU tensors; holding restored channels must move them."""
    with fake_cuda(real_inputs=True):
        net = nn.Sequential(nn.Linear(4, 5))
        SelfCompressor().install(net)
        (layer,) = quantized_layers(net)
    guard = PreservationGuard()
    mask = torch.tensor([True, False, True, False, False])
    guard._frozen = {layer.qualified: (mask, torch.full((5,), 6.0), torch.full((5,), -4.0))}
    with fake_cuda(real_inputs=True):
        guard._hold(net)  # type: ignore[arg-type]
        assert layer.quantizer.b.device == CUDA


def test_fit_end_work_runs_on_the_training_device_and_the_model_returns_to_the_cpu():
    """Lightning moves the module (and optimizer states) to the CPU before ``on_fit_end``; the fit-end callbacks take
    them back to ``strategy.root_device`` for their analysis and return them afterwards, also when it raises.
    (Recorded moves: fake tensors cannot stand in here, as modules swap them and the fake mode holds weak refs.)"""
    from types import SimpleNamespace

    from lightning_xai.callbacks._data import on_training_device

    moves: list = []

    class Recorded(nn.Linear):
        def to(self, *args, **kwargs):  # type: ignore[override]
            moves.append(("model", torch.device(args[0])))
            return self

    class RecordedState(torch.Tensor):
        def to(self, *args, **kwargs):  # type: ignore[override]
            moves.append(("state", torch.device(args[0])))
            return self

    model = Recorded(3, 2)
    state = {"step": torch.tensor(1.0), "exp_avg": torch.Tensor._make_subclass(RecordedState, torch.zeros(2, 3))}
    opt = SimpleNamespace(state={model.weight: state})
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=CUDA), optimizers=[opt])
    with on_training_device(trainer, model) as device:
        assert device == CUDA
        assert moves == [("model", CUDA), ("state", CUDA)]  # the CPU step counter stays (torch.optim's choice)
    assert moves[2:] == [("model", torch.device("cpu")), ("state", torch.device("cpu"))]
    moves.clear()
    with pytest.raises(RuntimeError, match="analysis failed"):
        with on_training_device(trainer, model):
            raise RuntimeError("analysis failed")
    assert moves[-2:] == [("model", torch.device("cpu")), ("state", torch.device("cpu"))]
    moves.clear()
    same = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), optimizers=[opt])
    with on_training_device(same, model) as device:
        assert device.type == "cpu"
    assert moves == []  # already there: nothing moved
