"""Every row of docs/ERRORS.md: the code raises exactly the documented error."""

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bad_input_cases import CASES
from helpers import assert_same_state, state_copy
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

import lightning_xai
from lightning_xai import DigitsDataModule
from lightning_xai.attribution.causal import classify_neurons
from lightning_xai.attribution.layers import L1Scorer
from lightning_xai.attribution.lrp import AlphaBeta, Composite, lrp
from lightning_xai.data import make_datamodule
from lightning_xai.models import ImageClassifier
from lightning_xai.models.nets import MLP, LeNet, SmallResNet, build_model
from lightning_xai.pruning.cswap import cswap_order
from lightning_xai.pruning.layer_pruning import prune_layers
from lightning_xai.pruning.surgery import ChannelCut, apply_cuts
from lightning_xai.pruning.units import count_parameters, find_units
from lightning_xai.quantization.export import export_compressed
from lightning_xai.quantization.install import install_quantizers

ROOT = Path(__file__).resolve().parents[1]


def _mlp_units(nan: bool = False):
    net = MLP(4, 3, 8)
    units, _ = find_units(net, torch.randn(2, 4))
    x = torch.randn(6, 4)
    if nan:
        x[2, 1] = float("nan")
    return units, x, torch.tensor([0, 1, 2, 0, 1, 2])


class _Branching(nn.Module):
    """A forward with Python control flow on a tensor value (torch.fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


TMP = Path(tempfile.gettempdir())


def _folder():
    path = TMP / "lxai_folder"
    path.mkdir(exist_ok=True)
    return str(path)


def _file():
    return str(TMP / "lxai_out.safetensors")


def _fit(callbacks, val_size=None, net="lenet", lazy=False, paired=False):
    """Fit a small digits classifier with ``callbacks`` for 2 batches (the error is expected on the way); ``lazy``:
    its first Linear layer replaced by an ``nn.LazyLinear`` that no forward has initialized yet; ``paired``: samples
    of two inputs, ``((image, image), label)``, as a model of several inputs reads."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=32)
    val = dm.val_dataloader()
    if val_size is not None:
        x, y = dm.dataset("val").tensors
        val = DataLoader(TensorDataset(x[:val_size], y[:val_size]))
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(TMP / "lxai_fit"),
    )
    model = ImageClassifier(net)
    if lazy:
        first = next(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        parent, _, attr = first.rpartition(".")
        out = model.get_submodule(first).out_features
        setattr(model.get_submodule(parent), attr, torch.nn.LazyLinear(out))
    train = dm.train_dataloader()
    if paired:
        train, val = (DataLoader(_Paired(loader.dataset), batch_size=32) for loader in (train, val))
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)


class _Paired:
    """A map-style dataset whose samples are ``((x, x), y)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return (x, x), y


def _setup(callback, strategy):
    from types import SimpleNamespace

    callback.setup(SimpleNamespace(strategy=strategy, callbacks=[callback]), ImageClassifier("lenet"), "fit")


def _after_averaging(callback):
    """``callback``'s setup in a Trainer whose callbacks list Lightning's ``StochasticWeightAveraging`` first."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    averaging = StochasticWeightAveraging(swa_lrs=1e-3)
    callback.setup(SimpleNamespace(strategy=None, callbacks=[averaging, callback]), ImageClassifier("lenet"), "fit")


def _before_averaging(callback):
    """``callback``'s setup in a Trainer whose callbacks list ``StochasticWeightAveraging`` after it."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    averaging = StochasticWeightAveraging(swa_lrs=1e-3)
    callback.setup(SimpleNamespace(strategy=None, callbacks=[callback, averaging]), ImageClassifier("lenet"), "fit")


def _nan_model():
    net = LeNet()
    layers = install_quantizers(net)
    with torch.no_grad():
        layers[2].original[3, 0, 1, 1] = float("nan")
    return net


def _tied_net():
    net = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)
    )
    net[4].weight = net[2].weight
    return net


def _transposed_net():
    return nn.Sequential(nn.ConvTranspose2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))


def _quantized_lenet():
    model = ImageClassifier("lenet")
    install_quantizers(model)
    return model


def _packed():
    torch.manual_seed(0)
    path = TMP / "lxai_packed.safetensors"
    export_compressed(_quantized_lenet(), path)
    return path


def _flipped():
    data = bytearray(_packed().read_bytes())
    data[-5] ^= 0x10  # a byte of tensor data
    path = TMP / "lxai_flipped.safetensors"
    path.write_bytes(bytes(data))
    return path


def _mnist(n):
    """A tiny MNIST folder in torchvision's layout (``n`` training and ``n`` test images)."""
    import gzip

    import numpy as np

    raw = TMP / f"lxai_mnist_{n}" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        head_i = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        head_l = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big")
        with gzip.open(raw / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(head_i + images.tobytes())
        with gzip.open(raw / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(head_l + labels.tobytes())
    return str(raw.parents[1])


def _foreign_file():
    from safetensors.torch import save_file

    path = Path(tempfile.gettempdir()) / "lxai_foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    return path


# What the rows may use: the package's public face (``from lightning_xai import *``) and the functions imported above.
# Built explicitly, so a row that names something we do not export fails `test_no_row_is_a_broken_name` instead of
# being recorded as a NameError (which once made all 38 rows compare a NameError with itself).
NAMESPACE = {name: getattr(lightning_xai, name) for name in lightning_xai.__all__}
NAMESPACE.update(
    torch=torch,
    nn=nn,
    MLP=MLP,
    LeNet=LeNet,
    SmallResNet=SmallResNet,
    build_model=build_model,
    make_datamodule=make_datamodule,
    find_units=find_units,
    count_parameters=count_parameters,
    cswap_order=cswap_order,
    classify_neurons=classify_neurons,
    prune_layers=prune_layers,
    L1Scorer=L1Scorer,
    lrp=lrp,
    AlphaBeta=AlphaBeta,
    Composite=Composite,
    install_quantizers=install_quantizers,
    export_compressed=export_compressed,
    apply_cuts=apply_cuts,
    ChannelCut=ChannelCut,
    FSDPStrategy=FSDPStrategy,
    ImageClassifier=ImageClassifier,
    **{
        name: obj
        for name, obj in globals().items()
        if name.startswith("_") and callable(obj) and not name.startswith("__")
    },
)


def run_case(code: str) -> tuple[str, str]:
    """The error type and message ``code`` raises (the namespace above holds what the rows use)."""
    try:
        eval(code, dict(NAMESPACE))  # noqa: S307 - the rows are our own documentation
    except Exception as err:  # noqa: BLE001
        message = str(err).replace(str(Path(tempfile.gettempdir())), "<tmp>")
        return type(err).__name__, " ".join(message.split())
    raise AssertionError(f"`{code}` did not raise")


def _documented() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "docs" / "ERRORS.md").read_text().splitlines():
        if line.startswith("| ") and "`" in line:
            code = line.split("`")[1]
            rows[code] = line.rsplit(" | ", 1)[1].rstrip(" |").replace("\\|", "|")
    return rows


def test_the_table_has_at_least_55_rows_and_matches_the_cases():
    documented = _documented()
    assert len(CASES) >= 55
    assert [code for _, code in CASES] == list(documented)


_OUR_NAMES = set(NAMESPACE) | {"lightning_xai"}


@pytest.mark.parametrize("title,code", CASES, ids=[t for t, _ in CASES])
def test_no_row_is_a_broken_name(title, code):
    """A documented error must come from our validation, not from a name the row cannot reach."""
    expected = _documented()[code]
    kind = expected.split(":", 1)[0]
    assert kind not in ("NameError", "ImportError", "ModuleNotFoundError"), expected
    if kind == "AttributeError":
        assert not any(f"'{name}'" in expected for name in _OUR_NAMES), expected


@pytest.mark.parametrize("title,code", CASES, ids=[t for t, _ in CASES])
def test_documented_error(title, code):
    kind, message = run_case(code)
    expected = _documented()[code]
    assert f"{kind}: {message}" == expected
    assert "`" in message or "LRP" in message or "offline" in message.lower() or "not" in message, message


@pytest.mark.parametrize(
    "make",
    [
        lambda: lightning_xai.SelfCompression(),
        lambda: lightning_xai.PreservationGuard(),
        lambda: lightning_xai.CSWAPPruning(),
        lambda: lightning_xai.AttributionPruning(),
        lambda: lightning_xai.LRPCompression(),
    ],
    ids=["SelfCompression", "PreservationGuard", "CSWAPPruning", "AttributionPruning", "LRPCompression"],
)
def test_every_callback_refuses_a_sharded_strategy_before_touching_the_model(make):
    """FSDP (like DeepSpeed) shards the parameters and restores callback state after ``on_fit_start``: every callback
    names itself and the strategy at ``setup``, and the model is left exactly as it was (no quantizer, no hook)."""
    callback = make()
    model = ImageClassifier("lenet")
    before = state_copy(model)
    with pytest.raises(ValueError, match=rf"{type(callback).__name__} does not support `strategy`=FSDPStrategy"):
        callback.setup(SimpleNamespace(strategy=FSDPStrategy(), callbacks=[callback]), model, "fit")
    assert_same_state(model, before)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
