"""No new CPU-default tensor in library code: every ``torch.<factory>(...)`` call in ``lightning_xai/`` either names
its ``device=`` or is in the allow-list below, with the reason it may live on the CPU. A new factory call without a
device fails this test until it gets one (or a reason)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_xai"
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "eye", "randperm", "randn", "rand"}

# (file relative to lightning_xai/, enclosing function) -> why a CPU tensor is right there
ALLOWED = {
    ("_datasets.py", "dataset_labels"): "labels are read on the CPU to choose samples by index",
    ("_datasets.py", "dataset_inputs"): "indices into a CPU dataset",
    ("_datasets.py", "_label"): "one label read on the CPU (labels are chosen from by index)",
    ("_datasets.py", "_input"): "one sample's input as the dataset holds it (moved to the device batch by batch)",
    ("pruning/surgery.py", "_compose_origin"): "which original channels a tensor kept: CPU bookkeeping",
    ("pruning/surgery.py", "restore_layout"): "the same bookkeeping read back from a checkpoint",
    ("callbacks/preservation_guard.py", "channels_removed"): "bookkeeping mask over a CPU-stored snapshot",
    ("data/digits.py", "__iter__"): "sampler indices for a DataLoader",
    ("data/names.py", "encode_names"): "dataset construction on the CPU",
    ("data/vision.py", "setup"): "split indices",
    ("pruning/cswap.py", "class_balanced_samples"): "sample choice by index on the CPU",
    ("pruning/cswap.py", "cswap_order"): "result table filled from host values (categories, ξ)",
    ("pruning/cswap.py", "_critical_rows"): "small row mask, moved to the output's device in the hook",
    ("pruning/cswap.py", "random_order"): "a seeded permutation of neuron indices (host data)",
    ("pruning/cswap.py", "sauce"): "area under a curve of host floats",
    ("quantization/export.py", "export_compressed"): "the packed file is assembled on the host",
    ("quantization/export.py", "read_compressed"): "a file is read into CPU tensors",
    ("quantization/mixed.py", "_layer_tensors"): "the packed file is assembled on the host",
    ("callbacks/lrp_compression.py", "__init__"): "argument validation with a dummy relevance",
}


def _factory_calls_without_device() -> list[tuple[str, str, int, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            func = node.func
            if not (isinstance(func.value, ast.Name) and func.value.id == "torch" and func.attr in FACTORIES):
                continue
            if any(k.arg == "device" for k in node.keywords):
                continue
            scope, up = "<module>", parents.get(node)
            while up is not None:
                if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    scope = up.name
                    break
                up = parents.get(up)
            found.append((rel, scope, node.lineno, func.attr))
    return found


def test_every_tensor_factory_names_its_device_or_has_a_reason():
    offenders = [
        f"{rel}:{line} torch.{name}(...) in {scope}()"
        for rel, scope, line, name in _factory_calls_without_device()
        if (rel, scope) not in ALLOWED
    ]
    assert not offenders, "tensor factories without device= (add device=..., or a reason to ALLOWED):\n" + "\n".join(
        offenders
    )


def test_the_allow_list_has_no_stale_entries():
    used = {(rel, scope) for rel, scope, _, _ in _factory_calls_without_device()}
    assert set(ALLOWED) <= used, sorted(set(ALLOWED) - used)
