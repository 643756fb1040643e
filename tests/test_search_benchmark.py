"""The search benchmark (benchmarks/search.py): its step-cost mode, end to end on the small space."""

from __future__ import annotations

import json

from helpers import load_benchmark


def test_step_cost_times_search_yaml_s_implicit_options_against_the_class_defaults(tmp_path):
    bench = load_benchmark("search")
    out = tmp_path / "step_cost.json"
    assert bench.main(["--step-cost", "--space", "small", "--threads", "1", "--rounds", "1", "--steps", "1",
                       "--out", str(out)]) == 0
    rows = {row["options"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["search.yaml"]["hypergrad_options"] == {"solver": "cg", "terms": 1, "damping": 100.0,
                                                        "hvp": "finite_difference"}
    assert rows["class defaults"]["hypergrad_options"] == "Implicit's defaults"
    for row in rows.values():  # the figures themselves are the benchmark's (RESULTS.md), not a test's
        assert len(row["rounds"]) == 1 and row["s_per_step"] == row["rounds"][0] > 0
