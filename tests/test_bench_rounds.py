"""bench/common.py's interleaved rounds and their summary: the order the sides run in, and a verdict from medians."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from helpers import REPO_ROOT

_spec = importlib.util.spec_from_file_location("bench_common", REPO_ROOT / "bench" / "common.py")
bench_common = sys.modules["bench_common"] = importlib.util.module_from_spec(_spec)  # (its dataclass looks it up)
_spec.loader.exec_module(bench_common)


def test_sides_alternate_within_a_round_and_the_order_turns_every_other_round():
    calls = []

    def side(name):
        def run():
            calls.append(name)
            return f"{name}{sum(1 for call in calls if call == name)}"

        return run

    results = bench_common.interleaved({name: side(name) for name in "ABC"}, rounds=3)
    assert calls == list("ABCCBAABC")
    assert results == {"A": ["A1", "A2", "A3"], "B": ["B1", "B2", "B3"], "C": ["C1", "C2", "C3"]}


def test_a_ratio_is_taken_within_each_round():
    assert bench_common.per_round([2.0, 3.0], [1.0, 4.0]) == [2.0, 0.75]
    with pytest.raises(ValueError):
        bench_common.per_round([1.0, 2.0], [1.0])


def test_the_verdict_comes_from_the_medians_and_names_the_figures_a_rerun_may_judge_otherwise():
    Target = bench_common.Target
    rounds = {
        "ratio": [1.0, 1.3, 1.25, 1.5, 1.1],  # median 1.25: met, though two rounds missed
        "fraction": [0.99, 0.97, 0.98],  # every round meets it
        "blocked": [0.02, 0.005, 0.004],
    }  # at most 0.01: median 0.005 met, one round missed
    summary = bench_common.summarise(
        rounds, {"ratio": Target(1.2), "fraction": Target(0.95), "blocked": Target(0.01, at_least=False)}
    )
    assert (summary["ratio"], summary["fraction"], summary["blocked"]) == (1.25, 0.98, 0.005)
    assert summary["spread"]["ratio"] == {"min": 1.0, "max": 1.5, "rounds": [1.0, 1.3, 1.25, 1.5, 1.1]}
    assert summary["meets_targets"] is True
    assert summary["unsure"] == ["ratio", "blocked"]
    missed = bench_common.summarise({"ratio": [1.0, 1.1, 1.3]}, {"ratio": Target(1.2)})
    assert (missed["meets_targets"], missed["unsure"]) == (False, ["ratio"])
