"""Benchmarks run in quick mode and print the JSON keys their issues ask for (full runs are not part of the suite)."""

import json
from pathlib import Path

import pytest
from helpers import load_benchmark

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
    result = load_benchmark(name).main(["--quick"])
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
    module = load_benchmark("coverage")
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
    summary = load_benchmark("transformer_removal").main(["--quick"])
    demo = summary["demo_transformer"]
    assert {"heads_removed_of_dead", "mlp_units_removed_of_dead", "params_ratio", "macs_ratio"} <= set(demo)
    assert demo["reload_exact"] and summary["vit_small"]["reload_exact"]
    assert demo["heads_dead"] > 0 and demo["heads_removed_of_dead"] == 1.0  # γ = 5 kills heads within 12 steps
    assert (ROOT / "BENCHMARKS.md").read_text() == before


def test_mnist_compares_guard_and_random_set_at_equal_size_on_the_unguarded_curve():
    """The aggregation (no MNIST needed): each guarded run is judged by its accuracy above the unguarded γ sweep at
    its own packed size (linear in log-size), so the selected and the random preservation sets are compared at
    equal size even when they end at different sizes; sizes outside the sweep give None, never an extrapolation."""
    import math

    mnist = load_benchmark("mnist")

    def run(seed, guard, random_set):
        entry = {"acc": 0.9, "bytes": 1000, "seconds": 1.0}
        methods = ("cswap", "lamp", "taylor", "omp", "random")
        fit_end = {m: {"acc_at_50": 0.5, "sauce": 50.0, "seconds": 0.1} for m in methods}
        return {
            "model": "m", "seed": seed, "skipped": {}, "float": {**entry, "bytes": 100_000},
            "sc_guard": {**entry, **guard, "restorations": 1, "restorations_second_half": 0},
            "sc_guard_random_set": {**entry, **random_set},
            "sc_unguarded_sweep": [
                {"gamma": 0.0, "bytes": 40_000, "acc": 0.98},
                {"gamma": 0.1, "bytes": 4_000, "acc": 0.96},
                {"gamma": 1.0, "bytes": 1_000, "acc": 0.90},
            ],
            "fit_end_pruning": fit_end, "lrp": {"lrp_acc": 0.9, "lrp_size_ratio": 0.2},
        }  # fmt: skip

    runs = [
        run(0, {"bytes": 2_000, "acc": 0.95}, {"bytes": 20_000, "acc": 0.975}),
        run(1, {"bytes": 500, "acc": 0.95}, {"bytes": 4_000, "acc": 0.96}),  # guard below the sweep: None
    ]
    guard = mnist.aggregate(runs)["m"]["guard"]
    t = math.log(2_000 / 1_000) / math.log(4_000 / 1_000)  # between the 1 kB and 4 kB points
    at_guard = 90 + t * (96 - 90)
    t = math.log(20_000 / 4_000) / math.log(40_000 / 4_000)
    at_random = 96 + t * (98 - 96)
    assert guard["guard_minus_unguarded_at_equal_size"][0] == pytest.approx(95 - at_guard)
    assert guard["random_set_minus_unguarded_at_equal_size"][0] == pytest.approx(97.5 - at_random)
    assert guard["selected_minus_random_at_equal_size"][0] == pytest.approx((95 - at_guard) - (97.5 - at_random))
    assert guard["guard_minus_unguarded_at_equal_size"][1] is None
    assert guard["random_set_minus_unguarded_at_equal_size"][1] == pytest.approx(0.0)
    assert guard["selected_minus_random_at_equal_size"][1] is None
    assert guard["selected_minus_random_set"][0] == pytest.approx(95 - 97.5)  # the raw difference stays reported


def test_mnist_peer_sizes_take_lzma_only_when_it_is_smaller():
    import os

    mnist = load_benchmark("mnist")
    noise = os.urandom(5_000)
    assert mnist._best(noise) == len(noise)  # incompressible: the file as is
    assert mnist._best(bytes(5_000)) < 200  # zeros: the compressed size


def test_mnist_reuses_peers_only_where_the_float_model_reproduces(tmp_path):
    """``--reuse-peers``: the trained peers' entries (and their skip notes) come from an earlier worker output only
    when it sized the peers' files the same way and that seed's float model has the same test accuracy to the last
    digit; ours, never."""
    import json

    mnist = load_benchmark("mnist")
    old = {
        "float": {"acc": 0.9766, "seconds": 20.0}, "sc_default": {"acc": 0.9}, "sc_guard": {"acc": 0.9},
        "fit_end_pruning": {},
        "diffq_1": {"acc": 0.98}, "qat_int8": {"acc": 0.97}, "brevitas_w4": {"acc": 0.96},
        "model_pruning_97": {"acc": 0.95}, "skipped": {"x": "y"}, "peer_sizing": mnist.PEER_SIZING,
    }  # fmt: skip
    (tmp_path / "lenet300100.0.json").write_text(json.dumps(old))
    (tmp_path / "lenet300100.2.json").write_text(json.dumps({k: v for k, v in old.items() if k != "peer_sizing"}))
    reused = mnist._reused_peers(str(tmp_path), "lenet300100", 0, 0.9766)
    assert set(reused) == {"diffq_1", "qat_int8", "brevitas_w4", "model_pruning_97", "skipped"}
    assert reused["qat_int8"] == {"acc": 0.97, "float_seconds": 20.0}  # time ratios stay within their own run
    assert mnist._reused_peers(str(tmp_path), "lenet300100", 0, 0.9765) == {}  # float differs: train them again
    assert mnist._reused_peers(str(tmp_path), "lenet300100", 1, 0.9766) == {}  # no output for that seed
    assert mnist._reused_peers(None, "lenet300100", 0, 0.9766) == {}
    assert mnist._reused_peers(str(tmp_path), "lenet300100", 2, 0.9766) == {}  # peers' files sized another way


def test_mnist_merges_a_partial_rerun_only_into_the_same_float_model(tmp_path):
    """``--only`` + ``--merge-from``: the groups re-run replace their old entries (with their time ratio against the
    new run's float model), everything else is the earlier run's, the output records the re-run; a run whose float
    model does not reproduce is refused, and so is an unknown group."""
    import json

    import pytest

    mnist = load_benchmark("mnist")
    old = {
        "model": "lenet5caffe", "seed": 1, "float": {"acc": 0.9888, "seconds": 80.0},
        "sc_default": {"acc": 0.90, "seconds": 90.0}, "sc_recommended": {"acc": 0.91, "seconds": 95.0},
        "sc_guard": {"acc": 0.92}, "sc_guard_random_set": {"acc": 0.93}, "qat_int8": {"acc": 0.97},
        "skipped": {"diffq": "x"}, "fit_end_pruning": {"cswap": 1},
    }  # fmt: skip
    (tmp_path / "lenet5caffe.1.json").write_text(json.dumps(old))
    new = {
        "model": "lenet5caffe", "seed": 1, "skipped": {}, "peer_sizing": mnist.PEER_SIZING,
        "float": {"acc": 0.9888, "seconds": 100.0}, "sc_recommended": {"acc": 0.95, "seconds": 120.0},
    }  # fmt: skip
    out = mnist._merged(str(tmp_path), new, ("sc_recommended",))
    assert out["sc_recommended"] == {"acc": 0.95, "seconds": 120.0, "float_seconds": 100.0}
    assert out["float"] == old["float"] and out["sc_default"] == old["sc_default"]
    assert out["sc_guard"] == old["sc_guard"] and out["qat_int8"] == old["qat_int8"]
    assert out["skipped"] == {"diffq": "x"} and "peer_sizing" not in out  # the old run's peers, its bookkeeping
    assert out["rerun"][0]["groups"] == ["sc_recommended"]
    both = mnist._merged(str(tmp_path), new | {"sc_guard": {"acc": 0.5, "seconds": 1.0}}, ("guard",))
    assert "sc_guard_random_set" not in both and both["sc_guard"]["acc"] == 0.5  # a group is replaced whole
    with pytest.raises(SystemExit, match="different models"):
        mnist._merged(str(tmp_path), new | {"float": {"acc": 0.9887, "seconds": 1.0}}, ("sc_recommended",))
    with pytest.raises(SystemExit, match="--only must name"):
        mnist._wanted("sc_recommended,peer")
    assert "peers" in mnist._wanted(None) and "diffq" not in mnist._wanted(None)  # the peers once, as one group


def test_mnist_units_cover_every_group_once_and_combine_into_one_worker_output():
    """The full run splits each model and seed into units of work (ours with the float model; the peers in two
    units without one) and puts them back together: every group in exactly one unit, the float model's unit as the
    base, the others' entries added, skip notes united; two units holding the same entry, or none with the float
    model, are refused."""
    import pytest

    mnist = load_benchmark("mnist")
    groups = [g for unit in mnist.UNITS for g in unit]
    assert sorted(groups) == sorted(mnist.OURS + mnist.PEER_GROUPS)  # each once; "peers" is their union
    assert mnist._peer_groups(("peers",)) == mnist.PEER_GROUPS
    assert mnist._peer_groups(("sc_default", "qat_int8")) == ("qat_int8",)
    ours = {
        "model": "m", "seed": 2, "skipped": {}, "peer_sizing": mnist.PEER_SIZING,
        "float": {"acc": 0.98, "seconds": 10.0}, "sc_default": {"acc": 0.97, "seconds": 12.0},
    }  # fmt: skip
    quant = {"model": "m", "seed": 2, "skipped": {"diffq": "not installed"}, "peer_sizing": mnist.PEER_SIZING,
             "qat_int8": {"acc": 0.96, "seconds": 15.0}}  # fmt: skip
    pruning = {"model": "m", "seed": 2, "skipped": {}, "model_pruning_90": {"acc": 0.95, "seconds": 11.0}}
    out = mnist._combined([quant, ours, pruning])
    assert out["float"] == ours["float"] and out["sc_default"] == ours["sc_default"]
    assert out["qat_int8"] == quant["qat_int8"] and out["model_pruning_90"] == pruning["model_pruning_90"]
    assert out["skipped"] == {"diffq": "not installed"} and out["seed"] == 2
    guard = {"acc": 0.9, "bytes": 1000, "seconds": 1.0, "restorations": 1, "restorations_second_half": 0}
    methods = ("cswap", "lamp", "taylor", "omp", "random")
    fit_end = {m: {"acc_at_50": 0.5, "sauce": 50.0, "seconds": 0.1} for m in methods}
    rest = {"sc_guard": guard, "sc_guard_random_set": guard, "sc_unguarded_sweep": [], "fit_end_pruning": fit_end,
            "lrp": {}}  # fmt: skip
    out["float"]["bytes"] = out["sc_default"]["bytes"] = out["qat_int8"]["bytes"] = 1000
    out["model_pruning_90"]["bytes"] = 1000
    table = mnist.aggregate([out | rest])["m"]["table"]
    assert table["qat_int8"]["time_ratio"] == pytest.approx(1.5)  # against the float model of its own seed
    with pytest.raises(SystemExit, match="both hold"):
        mnist._combined([ours, quant, quant])
    with pytest.raises(SystemExit, match="float model"):
        mnist._combined([quant, pruning])
