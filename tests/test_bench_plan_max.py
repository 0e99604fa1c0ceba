"""``bench/bench_plan_max.py``: a plan's configuration reaches the training bench unchanged, the longer length
it checks is valid for that configuration, and the training bench records a pre-flight refusal."""
from __future__ import annotations

import json
import os
import sys

import pytest

from bench.bench_plan_max import refused_length, train_flags
from tests.test_bench import torchrun

PLANNED = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    "long_context": {"ulysses_degree": 1, "ring_degree": 1, "kernel": "auto",
                     "fpdt": {"chunk_size": 32768, "offload": True}, "keep_attention_output": False,
                     "checkpoint_offload": 3, "checkpoint_layers": None, "checkpoint_every": 1,
                     "mlp_tile_tokens": 16384, "loss_tile_tokens": None,
                     "lean_rms_norm": True, "host_optimizer_states": False, "seq_len": 524288},
}


@pytest.mark.parametrize("checkpoint_offload,checkpoint_layers,checkpoint_every",
                         [(3, None, 1), (True, None, 3), (False, None, 1), (2, 20, 2)])
def test_a_planned_configuration_becomes_the_same_block_in_the_training_bench(monkeypatch, checkpoint_offload,
                                                                            checkpoint_layers, checkpoint_every):
    import bench.bench_train as bt

    planned = {**PLANNED, "long_context": {**PLANNED["long_context"], "checkpoint_offload": checkpoint_offload,
                                           "checkpoint_layers": checkpoint_layers,
                                           "checkpoint_every": checkpoint_every}}
    argv = ["bench_train.py", "--out", "x.json", "--seq_len", "524288", "--checkpointing", "--block_seq_len", "1",
            *train_flags(planned)]
    monkeypatch.setattr(sys, "argv", argv)
    args, _ = bt.parse_args()
    built = bt.ds_config(args, world=1)

    assert built["long_context"] == planned["long_context"]
    assert built["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_a_plan_with_the_moments_in_host_memory_becomes_the_same_block_in_the_training_bench(monkeypatch):
    import bench.bench_train as bt

    planned = {**PLANNED, "zero_optimization": {"stage": 3},
               "long_context": {**PLANNED["long_context"], "host_optimizer_states": True}}
    argv = ["bench_train.py", "--out", "x.json", "--seq_len", "524288", "--checkpointing", "--block_seq_len", "1",
            *train_flags(planned)]
    assert "--host_optimizer_states" in argv
    monkeypatch.setattr(sys, "argv", argv)
    args, _ = bt.parse_args()
    built = bt.ds_config(args, world=1)

    assert built["long_context"] == planned["long_context"]
    assert "offload_optimizer" not in built["zero_optimization"]
    assert built["optimizer"]["type"] == "AdamW"


def test_a_plan_with_fused_kernels_becomes_the_same_block_in_the_training_bench(monkeypatch):
    import bench.bench_train as bt

    fused = {"fused_norms": True, "fused_gated_mlp": True, "fused_rope": True}
    planned = {**PLANNED, "long_context": {**PLANNED["long_context"], **fused}}
    argv = ["bench_train.py", "--out", "x.json", "--seq_len", "524288", "--checkpointing", "--block_seq_len", "1",
            *train_flags(planned)]
    monkeypatch.setattr(sys, "argv", argv)
    args, _ = bt.parse_args()
    assert bt.ds_config(args, world=1)["long_context"] == planned["long_context"]


def test_the_refused_length_is_at_least_ten_percent_longer_and_divisible_by_the_chunk():
    block = PLANNED["long_context"]
    longer = refused_length(524288, block)
    assert longer >= 1.1 * 524288 and longer % 32768 == 0 and longer - 32768 < 1.1 * 524288
    hybrid = {**block, "ulysses_degree": 2, "ring_degree": 2, "fpdt": {"chunk_size": None}}
    assert refused_length(98304, hybrid) % 8 == 0 and refused_length(98304, hybrid) >= 1.1 * 98304


def test_the_training_bench_records_a_pre_flight_refusal_instead_of_training(tmp_path):
    d = torchrun("bench/bench_train.py", str(tmp_path / "r.json"), "--seq_len", "1024", "--hidden", "64",
                 "--intermediate", "128", "--layers", "2", "--heads", "4", "--kv_heads", "2", "--dtype", "float32",
                 "--checkpointing", "--chunk_size", "256", "--block_seq_len", "1",
                 "--gpu_memory_gib", "0.001", "--host_memory_gib", "16", nproc=1)

    assert "summary" not in d and d["ds_config"]["long_context"]["seq_len"] == 1024
    assert d["preflight_refused"].startswith("pre-flight: this step would not fit: GPU peak")


def test_committed_training_records_are_predicted_by_the_current_planner_within_its_targets(tmp_path, monkeypatch):
    """``bench_plan.py --records``: full-depth steps measured on the H200 (bench/results) against the planner."""
    import bench.bench_plan as bp

    out = tmp_path / "repredicted.json"
    pattern = os.path.join(os.path.dirname(__file__), "..", "bench", "results",
                           "alstcmp_ds_longctx_plan_llama3.2-3b_*.json")
    monkeypatch.setattr(sys, "argv", ["bench_plan.py", "--records", pattern, "--out", str(out)])
    bp.main()
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) >= 3
    for r in runs:  # the plan's targets: memory within 10%, time within 20% (these were within 5%)
        assert r["gpu_peak_gib_within"] and r["host_pinned_gib_within"] and r["step_seconds_within"], r["name"]
        assert abs(r["step_seconds_ratio"] - 1) < 0.05, r["name"]
