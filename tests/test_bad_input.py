"""Every row of docs/ERRORS.md: the code raises exactly the documented error."""

import tempfile
from pathlib import Path

import pytest
import torch
from bad_input_cases import CASES
from torch import nn

import lightning_xai
from lightning_xai.attribution.causal import classify_neurons
from lightning_xai.attribution.layers import L1Scorer
from lightning_xai.attribution.lrp import AlphaBeta, lrp
from lightning_xai.data import make_datamodule
from lightning_xai.models.nets import MLP, LeNet, SmallResNet, build_model
from lightning_xai.pruning.cswap import cswap_order
from lightning_xai.pruning.layer_pruning import prune_layers
from lightning_xai.pruning.units import count_parameters, find_units
from lightning_xai.quantization.install import install_quantizers

ROOT = Path(__file__).resolve().parents[1]


def _mlp_units():
    net = MLP(4, 3, 8)
    units, _ = find_units(net, torch.randn(2, 4))
    return units, torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])


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
    install_quantizers=install_quantizers,
    _mlp_units=_mlp_units,
    _foreign_file=_foreign_file,
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


def test_the_table_has_at_least_38_rows_and_matches_the_cases():
    documented = _documented()
    assert len(CASES) >= 38
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
