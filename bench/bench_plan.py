"""The planner's predictions against measured training steps on this machine's GPU.

Each configuration trains a Llama-shaped model (random init) with ``bench/bench_train.py`` (ZeRO-3, bf16,
activation checkpointing, one process per GPU) for a few steps and records the steady-state GPU peak (the
steps after the first optimizer step), the pinned host memory and the step time; the planner
(:mod:`ds_longctx.plan`) predicts the same three from the configuration alone.

    python bench/bench_plan.py --out $OUT/plan_h200x1.json [--only NAME,NAME] [--budget-s 560]
    python bench/bench_plan.py --predict bench/results/plan_h200x1.json   # predictions of the current planner

``--predict`` re-evaluates the predictions of a committed file's measured runs with the planner as it is
now (the measurements do not change; the file records which commit predicted).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import record_header, write_json  # noqa: E402

LLAMA_8B_WIDTHS = ["--hidden", "4096", "--intermediate", "14336", "--heads", "32", "--kv_heads", "8"]
LLAMA_3B = ["--model", "llama3.2-3b"]  # 28 layers, hidden 3072, 24/8 heads, 128,256 tokens, tied head
TILES = ["--mlp_tile_tokens", "16384"]

#: name -> bench_train arguments (every run: --checkpointing, bf16, cuDNN attention)
CONFIGS = {
    "4l_131k_plain": LLAMA_8B_WIDTHS + ["--layers", "4", "--seq_len", "131072"],
    "4l_262k_recompute_tiles": LLAMA_8B_WIDTHS + ["--layers", "4", "--seq_len", "262144",
                                                  "--keep_attention_output", "0"] + TILES,
    "4l_vocab128k_131k_loss_tiles": LLAMA_8B_WIDTHS + ["--layers", "4", "--seq_len", "131072", "--vocab", "128256",
                                                       "--loss_tile_tokens", "4096"] + TILES,
    "4l_262k_fpdt_device": LLAMA_8B_WIDTHS + ["--layers", "4", "--seq_len", "262144", "--chunk_size", "65536"]
    + TILES,
    "4l_262k_ckptoffload_partial": LLAMA_8B_WIDTHS + ["--layers", "4", "--seq_len", "262144",
                                                      "--checkpoint_offload", "2"] + TILES,
    "8l_262k_all_offload_optimizer_offload": LLAMA_8B_WIDTHS + [
        "--layers", "8", "--seq_len", "262144", "--chunk_size", "65536", "--offload", "--checkpoint_offload",
        "--offload_optimizer"] + TILES,
    "3b_full_131k": LLAMA_3B + ["--seq_len", "131072", "--loss_tile_tokens", "4096", "--checkpoint_offload",
                                "--offload_optimizer"] + TILES,
    "4l_524k_fpdt_offload_ckptoffload": LLAMA_8B_WIDTHS + [
        "--layers", "4", "--seq_len", "524288", "--chunk_size", "65536", "--offload", "--checkpoint_offload"]
    + TILES,
    "3b_full_262k_partial": LLAMA_3B + ["--seq_len", "262144", "--loss_tile_tokens", "4096",
                                        "--checkpoint_offload", "14", "--chunk_size", "65536", "--offload"] + TILES,
    # inputs rebuilt in backward (checkpoint_every): every third layer's input in host memory, the attention
    # recomputed, AdamW's moments in host memory; every second layer's on the GPU
    "3b_full_131k_every3_offload": LLAMA_3B + ["--seq_len", "131072", "--loss_tile_tokens", "4096",
                                               "--keep_attention_output", "0", "--checkpoint_offload",
                                               "--checkpoint_every", "3", "--host_optimizer_states"] + TILES,
    "3b_full_131k_every2_device": LLAMA_3B + ["--seq_len", "131072", "--loss_tile_tokens", "4096",
                                              "--checkpoint_every", "2", "--host_optimizer_states"] + TILES,
    "1l_1m_all_offload": LLAMA_8B_WIDTHS + ["--layers", "1", "--seq_len", "1048576", "--chunk_size", "65536",
                                            "--offload", "--checkpoint_offload", "--offload_optimizer"] + TILES,
}


def predict(record: dict, gpu_name: str) -> dict:
    """The planner's GPU peak, pinned host and step time for a bench_train record's configuration."""
    from ds_longctx.plan import ModelSpec, Run, Settings, ZeroSettings, estimate, rates_for
    from ds_longctx.plan.estimate import estimate_host

    from bench.train_config import keep_attention_output

    a = record
    model = ModelSpec(layers=a["layers"], hidden=a["hidden"], intermediate=a["intermediate"], heads=a["heads"],
                      kv_heads=a["kv_heads"], head_dim=a["hidden"] // a["heads"], vocab=a["vocab"],
                      tied_embeddings=bool(a.get("tie_word_embeddings") or a.get("tie_embeddings")))
    offload = a.get("checkpoint_offload") or 0
    settings = Settings(ulysses=a.get("ulysses") or record["world_size"] // a["ring"], ring=a["ring"],
                        kernel=a["kernel"], chunk_size=a["chunk_size"], fpdt_offload=bool(a["offload"]),
                        keep_attention_output=keep_attention_output(str(a["keep_attention_output"])),
                        # -1: every checkpointed layer (the first checkpoint_layers, else all)
                        checkpoint_offload_layers=(a.get("checkpoint_layers") or a["layers"]) if offload < 0 else offload,
                        checkpoint_layers=a.get("checkpoint_layers"),
                        checkpoint_every=a.get("checkpoint_every") or 1,
                        mlp_tile_tokens=a["mlp_tile_tokens"], loss_tile_tokens=a["loss_tile_tokens"],
                        lean_rms_norm=bool(a["lean_rms_norm"]),
                        host_optimizer_states=bool(a.get("host_optimizer_states")),
                        zero=ZeroSettings(optimizer_offload=bool(a["offload_optimizer"])))
    run = Run(model=model, world=record["world_size"], seq_len=a["seq_len"], checkpointing=bool(a["checkpointing"]))
    est = estimate(run, settings, rates_for(gpu_name), gpu_name)
    gib = 2 ** 30
    # what torch's pinned allocator held when the pool's buffers went through it (records before the pool
    # page-locked its own): every buffer rounded to a power of two
    as_then = sum(estimate_host(run, settings, pool_in_torch_allocator=True).values())
    return {"gpu_peak_gib": est.gpu_peak / gib, "host_pinned_gib": est.host_pinned / gib,
            "host_pinned_pool_in_torch_allocator_gib": as_then / gib,
            "step_seconds": est.step_seconds, "peak_moment": est.peak_moment,
            "components_gib": {k: v / gib for k, v in est.gpu_components.items()},
            "host_components_gib": {k: v / gib for k, v in est.host_components.items()},
            "time_components_s": est.time_components}


def measured(record: dict) -> dict:
    """Steady state of a bench_train record: the steps after the first optimizer step (of a fit probe, its one
    step at the length: its GPU peak is the whole step's, its time is not)."""
    steady = [r for r in record.get("steps", []) if r["step"] >= 1]
    if not steady:
        return {"oom": record.get("oom")}
    pool = max(r.get("host_pool_gib", 0.0) for r in steady)
    if all("host_pinned_total_gib" in r for r in steady):
        # the pool locks its own pages (not through torch's allocator): the allocator's peak plus the pool's bytes
        pinned, source = max(r["host_pinned_total_gib"] for r in steady), "process+pool"
    else:
        # older records: the pool's buffers came from torch's pinned host allocator, whose peak in the step counts
        # them (older still: its current bytes at the step's end)
        process_pinned = max(r.get("host_pinned_allocator_gib", r.get("pinned_host_gib", 0.0)) for r in steady)
        # the first runs (commit 37a9fca) read a stat key that does not exist: only the offload pool was measured
        source = "process" if process_pinned > 0 or pool == 0 else "pool"
        pinned = process_pinned if source == "process" else pool
    return {"gpu_peak_gib": max(r["peak_gib"] for r in steady),
            "host_pinned_gib": pinned, "host_pinned_source": source,
            "host_pool_gib": max(r.get("host_pool_gib", 0.0) for r in steady),
            "step_seconds": None if record.get("probe_layers") else sum(r["seconds"] for r in steady) / len(steady),
            "losses": [r["loss"] for r in record["steps"]], "oom": record.get("oom")}


def _measured_step(record: dict) -> bool:
    """Whether a record has a steady step to compare: a run that trained, or a fit probe that fit."""
    summary = record.get("summary") or {}
    return bool(summary.get("tokens_per_s") or summary.get("probe_peak_gib")) and "oom" not in record


def compare(row: dict) -> None:
    """Ratios predicted / measured, and whether each is within its target (10% memory, 20% time)."""
    p, m = dict(row["predicted"]), row["measured"]
    if m.get("host_pinned_source") in ("process", "pool") and "host_pinned_pool_in_torch_allocator_gib" in p:
        # measured when the pool's buffers came from torch's allocator, rounded to powers of two
        p["host_pinned_gib"] = p["host_pinned_pool_in_torch_allocator_gib"]
    if m.get("host_pinned_source") == "pool":  # DeepSpeed's pinned optimizer was not measured: the pool alone
        p["host_pinned_gib"] -= p["host_components_gib"].get("optimizer_offload", 0.0)
    for key, tol in (("gpu_peak_gib", 0.10), ("host_pinned_gib", 0.10), ("step_seconds", 0.20)):
        if m.get(key) is None:
            continue
        if m[key] == 0:
            row[f"{key}_within"] = p[key] < 0.05
            row[f"{key}_ratio"] = None
            continue
        ratio = p[key] / m[key]
        row[f"{key}_ratio"] = ratio
        row[f"{key}_within"] = abs(ratio - 1) <= tol


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", default="", help="comma-separated config names (default: all)")
    ap.add_argument("--steps", type=int, default=2, help="steps per run (step 0 has no optimizer states yet)")
    ap.add_argument("--budget-s", type=float, default=560.0, help="start no run after this many seconds")
    ap.add_argument("--predict", help="re-predict the runs of this JSON with the current planner (no GPU)")
    ap.add_argument("--records", help="with --out: a glob of bench_train records (e.g. bench/results/alstcmp_ds_*.json) "
                                      "gathered as the runs of a new file, then predicted as with --predict (runs "
                                      "that trained, and fit probes that fit)")
    ap.add_argument("--commit", default="")
    args = ap.parse_args()

    if args.records:
        import glob
        paths = sorted(p for p in glob.glob(args.records) if not p.endswith("_summary.json"))
        records = [(p, json.load(open(p))) for p in paths]
        payload = {"command": " ".join(sys.argv), "runs": [
            {"name": os.path.basename(p)[:-len(".json")], "source": p, "record": r} for p, r in records
            if _measured_step(r)]}
        args.predict = args.out
        write_json(args.out, payload)
    if args.predict:
        with open(args.predict) as f:
            payload = json.load(f)
        for row in payload["runs"]:
            if "record" in row:
                row["measured"] = measured(row["record"])
                row["predicted"] = predict(row["record"], (payload.get("gpus") or ["NVIDIA H200"])[0])
                compare(row)
        payload["predicted_at_commit"] = args.commit
        write_json(args.out or args.predict, payload)
        return
    import torch

    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    payload = record_header(1, args.commit)
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    payload.update(command=" ".join(sys.argv), runs=[])
    start = time.time()
    tmp = os.environ.get("TMPDIR", "/tmp")
    for name in names:
        if time.time() - start > args.budget_s:
            payload["runs"].append({"name": name, "skipped": "device-call budget"})
            continue
        out = os.path.join(tmp, f"plan_{name}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "bench/bench_train.py", "--mode", "ds_longctx", "--checkpointing", "--kernel", "sdpa_cudnn",
               "--steps", str(args.steps), "--warmup", "1", "--out", out, "--commit", args.commit] + CONFIGS[name]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = {"name": name, "args": CONFIGS[name], "wall_s": time.time() - t0, "returncode": proc.returncode}
        if os.path.exists(out):
            with open(out) as f:
                record = json.load(f)
            row["record"] = record
            row["measured"] = measured(record)
            row["predicted"] = predict(record, gpu_name)
            compare(row)
        else:
            row["stderr_tail"] = proc.stderr[-3000:]
        payload["runs"].append(row)
        print(name, json.dumps({k: row.get(k) for k in ("measured", "predicted") if k in row}, default=str)[:600],
              flush=True)
        write_json(args.out, payload)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
