"""Every row of docs/ERRORS.md: the code raises exactly the documented error."""

import tempfile
from pathlib import Path

import pytest
import torch
from bad_input_cases import CASES

from lightning_xai.models.nets import MLP
from lightning_xai.pruning.units import find_units

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


NAMESPACE = {k: v for k, v in globals().items() if not k.startswith("__")}


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


def test_the_table_has_at_least_25_rows_and_matches_the_cases():
    documented = _documented()
    assert len(CASES) >= 25
    assert [code for _, code in CASES] == list(documented)


@pytest.mark.parametrize("title,code", CASES, ids=[t for t, _ in CASES])
def test_documented_error(title, code):
    kind, message = run_case(code)
    expected = _documented()[code]
    assert f"{kind}: {message}" == expected
    assert "`" in message or "LRP" in message or "offline" in message.lower() or "not" in message, message
