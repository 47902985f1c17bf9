"""Training steps that neither log nor remove make no host synchronisation (counted by the overhead benchmark's
dispatch mode on the CPU: ``.item()``, ``bool(t)``, ``equal``, data-dependent shapes, device→host copies)."""

import pytest
from helpers import load_benchmark


def _overhead():
    return load_benchmark("overhead")


@pytest.mark.parametrize(("variant", "limit"), [("sc", 0), ("sc_guard", 1)])
def test_steps_without_logging_or_removal_do_not_sync(variant, limit):
    overhead = _overhead()
    plain = overhead._run("lenet", "plain", 3, 3, "cpu", True, False)
    run = overhead._run("lenet", variant, 3, 3, "cpu", True, False)
    assert plain["syncs_per_step"] == 0  # the baseline counts none either (Adam's CPU step counters excluded)
    assert run["syncs_per_step"] <= limit, run["sync_kinds"]
    assert run["ops_per_step"] > plain["ops_per_step"]  # the counter sees the callback's work


def test_overhead_reports_every_rounds_ratio_and_their_quartiles():
    """The step-time ratio of one pair of runs is noise on a shared CPU: a measurement keeps each round's ratio (the
    variant's median step over the plain run's of the same round) and their quartiles beside the pooled ratio."""
    res = _overhead().measure("lenet", 2, 3, "cpu", False, False)
    for v in ("sc", "sc_guard"):
        rounds = res[f"step_time_ratio_{v}_per_round"]
        assert len(rounds) == 3 and all(r > 0 for r in rounds)
        q1, q3 = res[f"step_time_ratio_{v}_iqr"]
        assert min(rounds) <= q1 <= q3 <= max(rounds)
    assert "step_time_ratio_sc_eager_per_round" not in res  # eager=False runs no eager variant
