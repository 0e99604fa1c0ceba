"""Soak (``bench/bench_soak.py``): training steps with FPDT offload, checkpoint offload, MLP and loss tiles under
ZeRO-3 keep resident memory and the host pool flat once warmed up, with finite losses.

CI runs a short soak (4 CPU ranks, Ulysses 2 x ring 2, 40 steps) and the one-rank smoke run of the GPU
command's code path; the 2,000-step CPU soak is the bench command in the README (its JSON is under
bench/results/), the GPU soak (50 steps at 262K tokens) the same script on a GPU."""
from __future__ import annotations

import math

import pytest

from tests.test_bench import torchrun

TINY = ["--seq_len", "512", "--hidden", "32", "--intermediate", "64", "--layers", "2", "--heads", "4",
        "--kv_heads", "2", "--chunk_size", "64", "--mlp_tile_tokens", "64", "--loss_tile_tokens", "64"]


def test_short_soak_on_four_ranks_keeps_resident_memory_and_the_host_pool_flat(tmp_path):
    d = torchrun("bench/bench_soak.py", str(tmp_path / "s.json"), "--steps", "40", "--warmup", "15",
                 "--ring", "2", *TINY, nproc=4)

    assert d["world_size"] == 4 and d["dp"] == 1 and [r["step"] for r in d["steps"]] == list(range(40))
    block = d["ds_config"]["long_context"]
    assert (block["ulysses_degree"], block["ring_degree"]) == (2, 2)
    assert block["fpdt"]["offload"] and block["checkpoint_offload"] and block["mlp_tile_tokens"] == 64
    for s in d["summary_per_rank"]:
        assert s["steps_after_warmup"] == 25 and s["losses_finite"]
        assert s["rss_drift"] < 0.05, s  # resident memory within 5% of the first step after warm-up
        assert s["host_pool_drift"] == 0.0, s  # the pinned pool reuses its buffers: not one byte more
    assert all(r["host_pool_at_start_bytes"] > 0 for r in d["steps"][1:])  # the offloads did go to the pool
    assert all(math.isfinite(r["loss"]) and 4.0 < r["loss"] < 7.0 for r in d["steps"])


def test_soak_bench_runs_on_one_cpu_rank_and_records_memory_at_each_step_start(tmp_path):
    d = torchrun("bench/bench_soak.py", str(tmp_path / "s1.json"), "--steps", "4", "--warmup", "1", *TINY, nproc=1)

    assert d["world_size"] == 1 and "bench_soak.py" in d["command"] and len(d["steps"]) == 4
    for r in d["steps"]:
        assert r["allocated_at_start_bytes"] == 0  # no allocator counters on CPU
        assert r["rss_at_start_bytes"] > 0 and r["seconds"] > 0
    assert d["steps"][0]["host_pool_at_start_bytes"] == 0 and d["steps"][1]["host_pool_at_start_bytes"] > 0
    assert set(d["summary"]) == {"steps_after_warmup", "allocated_drift", "rss_drift", "host_pool_drift",
                                 "losses_finite", "seconds_per_step"}
    assert d["summary"]["steps_after_warmup"] == 3 and d["summary"]["losses_finite"]


@pytest.mark.parametrize("values,expected", [([100, 103, 101], 0.03), ([0, 0], 0.0), ([5], 0.0)])
def test_drift_is_the_largest_rise_over_the_first_value(values, expected):
    from bench.bench_soak import drift

    assert drift(values) == pytest.approx(expected)
