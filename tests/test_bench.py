"""The GPU benchmarks run through on 2 CPU ranks (gloo) and write the JSON the report reads.

GPU time is scarce: a multi-rank bench must not meet its first bug on the GPU machine. These runs use tiny
sizes and float32; the numbers checked are the ones a CPU run can check (exactness, host-pool reuse, the
within-run ratios being the ratios of the rows), never speed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.test_example import ROOT, free_port


def torchrun(script: str, out: str, *args: str, nproc: int = 2) -> dict:
    launcher = shutil.which("torchrun")
    cmd = [launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nproc_per_node", str(nproc), "--master_port", str(free_port()), script, "--out", out, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(out) as f:
        return json.load(f)


def test_attention_bench_runs_every_implementation_on_two_ranks_with_exact_results(tmp_path):
    impls = ["single", "ulysses", "ring", "ring:reference", "deepspeed", "single#2"]
    d = torchrun("bench/bench_attention.py", str(tmp_path / "a.json"), "--kernel", "auto", "--dtype", "float32",
                 "--impls", ",".join(impls), "--seqs", "512", "--exact-seq", "512", "--iters", "2",
                 "--error-seq", "256")

    assert d["world_size"] == 2 and d["dtype"] == "float32" and "bench_attention.py" in d["command"]
    # distributed attention against the kernel on the whole sequence, out and gradients
    assert set(d["exactness_float32"]) == {"ulysses", "ring"}
    for name, errs in d["exactness_float32"].items():
        assert set(errs) == {"out", "dq", "dk", "dv"}
        assert max(errs.values()) < 1e-5, (name, errs)
    rows = {r["impl"]: r for r in d["results"]}
    assert list(rows) == impls
    single, ds = rows["single"], rows["deepspeed"]
    for impl, r in rows.items():
        assert r["total_tokens"] == 512 and r["tokens_per_gpu"] == 256
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_bwd_ms"] == pytest.approx(r["fwd_ms"] + r["bwd_ms"])
        # timed in rounds: one time per round for every implementation, and how far they spread
        assert r["rounds"] == 2 and len(r["fwd_ms_all"]) == len(r["bwd_ms_all"]) == 2 and r["spread"] >= 0
        assert r["peak_mem_gib"] is None  # no allocator counters on CPU
        assert r["vs_deepspeed_ulysses_cudnn"] == pytest.approx(r["tflops_per_gpu"] / ds["tflops_per_gpu"])
    for impl in ("single", "ulysses", "ring", "single#2"):  # the same kernel alone at the same tokens per GPU
        assert rows[impl]["vs_single_gpu_kernel"] == pytest.approx(
            rows[impl]["tflops_per_gpu"] / single["tflops_per_gpu"])
    # "ring:reference" has no "single:reference" row to compare with, and DeepSpeed runs its own kernel
    assert "vs_single_gpu_kernel" not in rows["ring:reference"] and "vs_single_gpu_kernel" not in ds
    assert rows["ring:reference"]["kernel"] == "reference" and ds["kernel"].startswith("sdpa_math")
    # bf16 against float64: the distributed error no larger than 1.5x one rank's (error-seq 256 by default here)
    growth = d["bf16_error_vs_float64"]
    assert growth["seq"] == 256 and set(growth["errors"]) == {"single", "ulysses", "ring"}
    assert all(0 < e < 2e-2 for errs in growth["errors"].values() for e in errs.values()), growth
    assert all(r <= 1.5 for r in growth["max_ratio_to_single"].values()), growth


def test_fpdt_bench_runs_its_sweeps_on_two_ranks_chunked_equal_to_unchunked(tmp_path):
    d = torchrun("bench/bench_fpdt.py", str(tmp_path / "f.json"), "--kernel", "auto", "--dtype", "float32",
                 "--mem-seqs", "1024", "--mem-modes", "unchunked,deepspeed,offload:256",
                 "--fit-seqs", "2048", "--fit-modes", "offload:512,deepspeed",
                 "--thr-seq", "1024", "--chunks", "256", "--iters", "1", "--trace-seq", "0", "--exact-seq", "512")

    assert d["world_size"] == 2 and (d["ulysses"], d["ring"]) == (2, 1)
    ex = d["exactness_float32_vs_unchunked"]
    assert set(ex) == {"chunk:128", "offload:128", "chunk:256", "offload:256"}
    for mode, errs in ex.items():
        assert max(errs.values()) < 1e-5, (mode, errs)
    mem = [(r["mode"], r["total_tokens"]) for r in d["memory"]]
    assert mem == [("unchunked", 1024), ("deepspeed", 1024), ("offload:256", 1024),
                   ("offload:512", 2048), ("deepspeed", 2048)]
    for r in d["memory"]:
        assert not r["oom"] and r["peak_gib"] is None  # no allocator counters on CPU
        if r["mode"].startswith("offload"):
            assert r["host_allocations_first_step"] > 0 and r["host_pool_held_gib"] > 0
        else:  # the pool is empty at the start of each row: nothing left over from the one before
            assert r["host_allocations_first_step"] == 0 and r["host_pool_held_gib"] == 0
    # the second step of the layer takes its host buffers from the pool: no new pinned allocation
    assert d["memory"][2]["host_allocations_later_steps"] == 0
    thr = {r["mode"]: r for r in d["throughput"]}
    assert list(thr) == ["unchunked", "offload:256", "chunk:256"]
    for r in thr.values():
        assert r["vs_unchunked"] == pytest.approx(r["tflops_per_gpu"] / thr["unchunked"]["tflops_per_gpu"])
    assert "overlap_trace" not in d  # the trace is CUDA's


@pytest.mark.parametrize("mode", ["ds_longctx", "deepspeed"])
def test_training_bench_trains_on_two_ranks_and_reports_each_step(tmp_path, mode):
    extra = (["--kernel", "auto", "--chunk_size", "128", "--offload", "--checkpoint_offload",
              "--mlp_tile_tokens", "128"] if mode == "ds_longctx" else [])
    d = torchrun("bench/bench_train.py", str(tmp_path / "t.json"), "--mode", mode, "--seq_len", "512",
                 "--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4", "--kv_heads", "2",
                 "--checkpointing", "--steps", "3", "--warmup", "1", *extra)

    assert d["world_size"] == 2 and "oom" not in d and [r["step"] for r in d["steps"]] == [0, 1, 2]
    # ds_longctx: both ranks hold one sequence (dp 1); plain ZeRO-3: each rank its own sequence (dp 2)
    assert d["dp"] == (1 if mode == "ds_longctx" else 2)
    for r in d["steps"]:
        assert 4.0 < r["loss"] < 7.0  # a byte model near its random start (ln 256 = 5.5)
        assert r["tokens_per_s"] == pytest.approx(512 * d["dp"] / r["seconds"])
    assert d["summary"]["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in d["steps"][1:]) / 2)
    if mode == "ds_longctx":
        assert d["kernel_resolved"] and d["ds_config"]["long_context"]["ulysses_degree"] == 2
        assert all(r["host_pool_gib"] > 0 for r in d["steps"])  # FPDT chunks and checkpoints went to the pool
        for r in d["steps"]:  # the pool locks its own pages, outside torch's allocator: both count
            assert r["host_pinned_total_gib"] == r["host_pinned_allocator_gib"] + r["host_pool_locked_gib"]
        assert "steady_host_pinned_total_gib" in d["summary"]


def test_measured_pinned_host_is_the_allocator_peak_plus_the_pool_and_older_records_keep_their_meaning():
    from bench.bench_plan import measured

    def record(*rows):
        return {"steps": [{"step": i, "peak_gib": 1.0, "seconds": 1.0, "loss": 5.0, **r} for i, r in enumerate(rows)]}

    now = record({}, {"host_pinned_allocator_gib": 12.0, "host_pool_gib": 69.0, "host_pool_locked_gib": 69.0,
                      "host_pinned_total_gib": 81.0})
    assert measured(now)["host_pinned_gib"] == 81.0 and measured(now)["host_pinned_source"] == "process+pool"
    # before the pool locked its own pages, torch's allocator peak already held the pool's (rounded) buffers
    before = record({}, {"host_pinned_allocator_gib": 91.0, "host_pool_gib": 69.0})
    assert measured(before)["host_pinned_gib"] == 91.0 and measured(before)["host_pinned_source"] == "process"
    first_runs = record({}, {"host_pinned_allocator_gib": 0.0, "host_pool_gib": 69.0})
    assert measured(first_runs)["host_pinned_source"] == "pool"


def test_implementations_are_timed_in_rounds_and_one_out_of_memory_leaves_the_others_timed():
    from bench.common import OOM, time_interleaved

    x = torch.randn(8, 8, requires_grad=True)
    calls = []

    def fwd(name):
        def run():
            calls.append(name)
            assert x.grad is None  # cleared before every run: nothing accumulates from the one before
            if name == "big" and len(calls) > 3:
                raise OOM("out of memory")  # in the first timed round
            return x * 2.0
        return run

    t = time_interleaved({"a": fwd("a"), "big": fwd("big"), "b": fwd("b")}, torch.ones(8, 8), [x],
                         iters=3, warmup=1)

    # round-robin in the given order; after its failure "big" is left out of the rounds
    assert calls == ["a", "big", "b", "a", "big", "b", "a", "b", "a", "b"]
    assert t["big"] == {"oom": True}
    for name in ("a", "b"):
        assert len(t[name]["fwd_ms_all"]) == 3 and t[name]["fwd_bwd_ms"] > 0 and t[name]["peak_bytes"] == 0
    assert x.grad is None


def test_documents_bench_runs_packed_and_unpacked_on_two_ranks_with_exact_results(tmp_path):
    topology = "ring"  # the ring's blocks split into documents on both sides (Ulysses: the diagonal only)
    d = torchrun("bench/bench_documents.py", str(tmp_path / "d.json"), "--dtype", "float32", "--seq", "512",
                 "--doc-lens", "100,512", "--exact-seq", "256", "--exact-doc", "70", "--iters", "2",
                 "--topology", topology)
    assert d["world_size"] == 2 and d["topology"] == topology
    assert max(d["exactness"].values()) < 1e-5, d["exactness"]
    assert d["skipped"] == ["fa4_varlen"]  # FlashAttention-4 needs a Hopper GPU and one rank
    rows = {(r["impl"], r["doc_len"]): r for r in d["results"]}
    assert set(rows) == {(i, n) for i in ("packed", "unpacked") for n in (100, 512)}
    assert rows[("packed", 100)]["documents"] == 6 and rows[("packed", 512)]["documents"] == 1
    for (impl, n), r in rows.items():
        assert r["tokens_per_gpu"] == 256 and r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert r["time_vs_unpacked" if impl == "packed" else "tflops_per_gpu"] > 0
    # one document spanning the sequence is the unpacked work, counted alike
    assert rows[("packed", 512)]["tflops_per_gpu"] * rows[("packed", 512)]["fwd_bwd_ms"] == pytest.approx(
        rows[("unpacked", 512)]["tflops_per_gpu"] * rows[("unpacked", 512)]["fwd_bwd_ms"])
