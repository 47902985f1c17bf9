"""Benchmarks run in quick mode and print the JSON keys their issues ask for (full runs are not part of the suite)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {
    "self_compression": {"float_acc", "compressed_acc", "bits_ratio", "step_time_ratio"},
    "cswap": {
        "sauce",
        "categories",
        "speedup_vs_naive",
        "same_decisions_as_naive",
        "neurons_per_s",
        "params_ratio_at_50",
        "latency_ratio_at_50",
    },
    "layer_attribution": {
        "baseline_acc",
        "attr_acc",
        "l1_acc",
        "rank_spearman",
        "attr_latency_ratio",
        "l1_latency_ratio",
        "bypass_attr_latency_ratio",
    },
    "lrp_compression": {"float_acc", "lrp_acc", "lrp_size_ratio", "magnitude_acc", "uniform_acc", "scoring_time_ratio"},
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_benchmark_quick_mode_prints_its_json(name, capsys):
    before = (ROOT / "BENCHMARKS.md").read_text()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert REQUIRED[name] <= set(result) and printed == json.loads(json.dumps(result))
    assert (ROOT / "BENCHMARKS.md").read_text() == before  # quick runs never rewrite the published numbers
    if name == "cswap":
        assert result["same_decisions_as_naive"] is True


def test_coverage_quick_smoke(capsys):
    """Two fast rows of the coverage matrix: every cell runs, nothing is cached or published in quick mode."""
    before = (ROOT / "BENCHMARKS.md").read_text()
    cache = ROOT / "benchmarks" / "results" / "coverage.jsonl"
    cached = cache.read_text() if cache.exists() else None
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_coverage", ROOT / "benchmarks" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--quick", "--models", "tabular_mlp,char_transformer", "--columns", "self_compression,attr_bypass,lrp"]
    summary = module.main(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")]
    assert summary["cells"] == 6 and summary["failed"] == 0 and summary["ran"] == 6, lines
    assert {"cells", "ran", "refused", "failed", "removed_fraction_of_dead"} <= set(summary)
    sc = next(c for c in lines if c.get("model") == "char_transformer" and c.get("callback") == "self_compression")
    assert sc["reload_exact"] and sc["heads_removed"] > 0  # heads really go on the names model
    assert (ROOT / "BENCHMARKS.md").read_text() == before
    assert (cache.read_text() if cache.exists() else None) == cached


def test_transformer_removal_quick_smoke(capsys):
    before = (ROOT / "BENCHMARKS.md").read_text()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "bench_transformer_removal", ROOT / "benchmarks" / "transformer_removal.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--quick"])
    demo = summary["demo_transformer"]
    assert {"heads_removed_of_dead", "mlp_units_removed_of_dead", "params_ratio", "macs_ratio"} <= set(demo)
    assert demo["reload_exact"] and summary["vit_small"]["reload_exact"]
    assert demo["heads_dead"] > 0 and demo["heads_removed_of_dead"] == 1.0  # γ = 5 kills heads within 12 steps
    assert (ROOT / "BENCHMARKS.md").read_text() == before
