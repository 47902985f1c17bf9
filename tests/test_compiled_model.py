"""A model the user compiled: ``trainer.fit(torch.compile(model))``, which Lightning unwraps, compiling the module's
``forward`` and ``*_step`` methods. The callbacks must neither break the compiled step's graph nor make it recompile
again and again (dynamo gives up after 8 recompiles and runs the step eagerly from then on), and they must decide
exactly what they decide for the same model uncompiled.

The tests compile with ``backend="aot_eager"``: dynamo's tracing, guards and graph breaks and AOT autograd's
functionalisation are the real ones, without inductor's code generation (minutes on this CPU; it changes the
arithmetic's rounding, not what is traced)."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import ClassifierSteps, halves_task, quiet_trainer
from torch import nn

from lightning_xai import (
    AttributionPruning,
    CompressionMixin,
    CSWAPPruning,
    PreservationGuard,
    SelfCompression,
    load_compressed,
)
from lightning_xai._compile import is_compiled
from lightning_xai.quantization import batched as batched_module
from lightning_xai.quantization.export import export_compressed


class Net(ClassifierSteps, pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        torch.manual_seed(1)
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 3),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


def _data():
    return halves_task(256, 12, 0.15)


def _graph_breaks() -> int:
    """Graph breaks, plus frames dynamo gave up on (``unimplemented``: it then ran the whole frame eagerly); not
    counted: the break around Lightning's own ``self.log`` (which it keeps out of graphs on purpose)."""
    counters = torch._dynamo.utils.counters
    breaks = {**counters["graph_break"], **counters["unimplemented"]}
    return sum(n for reason, n in breaks.items() if "_ResultCollection.log" not in reason)


def _versions(fn) -> int:
    """How many compiled versions dynamo holds for ``fn``'s code (1 + its recompiles)."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__))


def _fit(callbacks, compiled, epochs=4, lr=1e-2):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = Net(lr)
    target = torch.compile(model, backend="aot_eager") if compiled else model
    quiet_trainer(None, callbacks, max_epochs=epochs, limit_val_batches=1.0).fit(target, _data(), _data())
    if compiled:
        assert is_compiled(model)  # Lightning unwrapped it and compiled its methods
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
def test_self_compression_keeps_the_step_compiled_and_decides_as_eagerly(tmp_path, monkeypatch, batched):
    """``batched``: the accelerator's path (all layers quantized in one call before the forward, each quantizer served
    its slice), run on the CPU; a compiled step quantizes each layer in its own graph instead."""
    monkeypatch.setattr(batched_module, "BATCH_ON_CPU", batched)
    runs = {}
    for compiled in (False, True):
        cb = SelfCompression(gamma=2.0, remove_every_n_steps=4, export_path=str(tmp_path / f"{compiled}.safetensors"))
        model = _fit([cb], compiled)
        runs[compiled] = (cb, model, _graph_breaks(), _versions(Net.training_step) if compiled else 0)
    (eager, m_eager, _, _), (comp, m_comp, breaks, versions) = runs[False], runs[True]
    # nothing of ours breaks the graph: the batch-norm follower recorder (first batch), the served-weight lookup,
    # the batched quantization's hooks and the input capture are all traced
    assert breaks == 0
    # compiled once, again when the first batch's recorder hooks go, once more when b/e freeze; removal (4 times
    # eagerly here) waits for fit end, so no shape change recompiles it
    assert versions <= 3
    assert comp._bn_pairs == eager._bn_pairs == [("net.1", "net.0"), ("net.4", "net.3")]
    assert comp.channels_removed == eager.channels_removed > 0
    assert [p.shape for p in m_comp.parameters()] == [p.shape for p in m_eager.parameters()]
    x = next(iter(_data()))[0]
    m_comp.eval()
    fresh = load_compressed(tmp_path / "True.safetensors", Net()).eval()
    assert torch.equal(fresh(x), m_comp(x))


def test_the_guard_selects_as_eagerly_without_breaking_the_step():
    runs = {}
    for compiled in (False, True):
        guard = PreservationGuard(fraction=0.1, check_every_n_steps=2, max_drop=0.0)
        _fit([SelfCompression(gamma=1.0, log_every_n_steps=0), guard], compiled, epochs=2)
        runs[compiled] = guard
        if compiled:  # its set building, checks and per-step preservation pass ran eagerly, outside the step's graph
            assert _graph_breaks() == 0
            assert _versions(Net.training_step) <= 3
            assert _versions(Net.forward) == 0  # never compiled on its own (only inside training_step)
    assert runs[True].indices is not None and (runs[True].indices == runs[False].indices).all()
    assert runs[True].baseline == runs[False].baseline


def test_fit_end_analyses_of_a_compiled_model_decide_as_eagerly():
    """Same weights at fit end (the step runs compiled, but the optimizer's learning rate is 0): C-SWAP's plan, the
    layer chosen and every final tensor are those of the uncompiled model, and the analyses' own forwards (C-SWAP's
    pruned trials, torch-pruning's tracing, the layer scores) never compiled anything."""
    runs = {}
    for compiled in (False, True):
        cswap = CSWAPPruning(target_ratio=0.6, samples_per_class=8, curves=("cswap",))
        layers = AttributionPruning(fraction=0.34, mode="zero")
        model = _fit([cswap, layers], compiled, epochs=1, lr=0.0)
        runs[compiled] = (cswap.plan, layers.result["pruned"], {n: v.clone() for n, v in model.state_dict().items()})
        if compiled:
            assert _graph_breaks() == 0
            assert _versions(Net.training_step) == 1
            assert _versions(Net.forward) == 0
    eager, comp = runs[False], runs[True]
    assert comp[0] == eager[0] and comp[0]
    assert comp[1] == eager[1] and comp[1]
    assert comp[2].keys() == eager[2].keys()
    assert all(torch.equal(comp[2][n], v) for n, v in eager[2].items())


class MixinNet(CompressionMixin, Net):
    def training_step(self, batch, _):
        x, y = batch
        return self.compressed_loss(nn.functional.cross_entropy(self(x), y))


class _BitGradients(pl.Callback):
    """The gradients of every ``b`` just before each optimizer step (task loss + penalty), for the first steps."""

    def __init__(self, steps: int) -> None:
        self.steps, self.seen = steps, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if len(self.seen) < self.steps:
            named = pl_module.named_parameters()
            self.seen.append({n: p.grad.clone() for n, p in named if n.endswith(".b") and p.grad is not None})


def test_the_mixin_in_a_compiled_step_breaks_the_graph_once_and_trains_as_eagerly():
    """The penalty runs eagerly (it reads the warm-up's scale, the step and cached channel weights, which a traced
    graph would recompile on at every step until dynamo gave up on the step): one graph break around it, and the bit
    depths' gradients are the eager ones (the penalty counted once). Later steps drift apart by rounding only, which
    Adam's normalised steps on ``b`` amplify, so the gradients are compared over the first three steps."""
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model, grads = MixinNet(), _BitGradients(3)
        cb = SelfCompression(gamma=2.0, gamma_warmup=0.5, log_every_n_steps=0)
        target = torch.compile(model, backend="aot_eager") if compiled else model
        quiet_trainer(None, [grads, cb], max_epochs=3, limit_val_batches=1.0).fit(target, _data(), _data())
        runs[compiled] = grads.seen
        if compiled:
            counters = torch._dynamo.utils.counters
            assert not counters["unimplemented"]
            assert counters["graph_break"] and all("_lxai_penalty" in reason for reason in counters["graph_break"])
            assert _versions(MixinNet.training_step) <= 3
    assert len(runs[True]) == len(runs[False]) == 3
    for eager, comp in zip(runs[False], runs[True]):
        assert comp.keys() == eager.keys() and len(comp) == 4
        assert all(torch.allclose(comp[n], g, rtol=1e-4, atol=1e-7) for n, g in eager.items())


class SubCompiledNet(Net):
    """The user compiles a submodule themselves (its parameters' names then hold ``_orig_mod``)."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(lr)
        self.net = torch.compile(self.net, backend="aot_eager")


def test_a_compiled_submodule_is_treated_like_a_compiled_model(tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = SubCompiledNet()
    assert is_compiled(model)
    sc = SelfCompression(gamma=2.0, remove_every_n_steps=4)
    cswap = CSWAPPruning(target_ratio=0.6, samples_per_class=8, curves=("cswap",))
    guard = PreservationGuard(fraction=0.1, check_every_n_steps=2)
    quiet_trainer(None, [sc, guard, cswap], max_epochs=4, limit_val_batches=1.0).fit(model, _data(), _data())
    assert _graph_breaks() == 0
    # the submodule: compiled for training, again without the first batch's hooks and after the freeze (a graph
    # each); removal waited for fit end, and the callbacks' own forwards ran eagerly
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    assert sc.channels_removed > 0 and cswap.plan
    export_compressed(model, tmp_path / "m.safetensors")  # after C-SWAP too (as recipes/chain.py does)
    fresh = load_compressed(tmp_path / "m.safetensors", SubCompiledNet()).eval()
    x = next(iter(_data()))[0]
    with torch.compiler.set_stance("force_eager"):
        assert torch.equal(fresh(x), model.eval()(x))
