"""``bench/plan_longest.py``: the planner's longest length per model, with every input kept and with inputs
rebuilt, recorded with the machine it models and rendered by the report."""
from __future__ import annotations

import json
import sys

from bench import plan_longest


def test_rebuilt_inputs_reach_at_least_the_length_of_every_input_kept_and_the_report_lists_both(tmp_path,
                                                                                                monkeypatch):
    out = tmp_path / "plan_longest_small.json"
    monkeypatch.setattr(sys, "argv", ["plan_longest.py", "--models", "llama3.2-3b:4", "--gpu-memory-gib", "40",
                                      "--host-memory-gib", "64", "--out", str(out), "--commit", "abc"])
    plan_longest.main()
    record = json.loads(out.read_text())
    assert record["machine"] == {"gpus": 1, "gpu_name": "NVIDIA H200", "gpu_memory_gib": 40.0, "host_memory_gib": 64.0}
    kept, free = record["rows"]
    assert kept["fixed"] == {"checkpoint_every": 1} and kept["block"]["checkpoint_every"] == 1
    assert free["seq_len"] >= kept["seq_len"] > 0
    for row in (kept, free):
        assert row["gpu_peak_gib"] <= row["gpu_limit_gib"] and row["host_per_node_gib"] <= row["host_limit_gib"]

    from bench import report_planner
    monkeypatch.setattr(report_planner, "load", lambda pattern: [(out.name, record)] if "longest" in pattern else [])
    table = "\n".join(report_planner.plan_longest_tables())
    assert f"| {kept['seq_len']} | 1 |" in table and "rebuilt where needed" in table
