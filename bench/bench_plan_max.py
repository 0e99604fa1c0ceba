"""``ds-longctx plan --seq-len max`` put to the test: the longest length the planner predicts trains, and 10%
more is refused by ``ds_longctx.initialize``'s pre-flight check.

    python bench/bench_plan_max.py --cases bench4l_gpu40,3b_gpu40 --out-dir $OUT --budget-s 540 --commit X

For each case: the model's config is written (a transformers ``config.json``, random init, nothing
downloaded), ``ds-longctx plan --seq-len max --json`` chooses the length and the configuration,
``bench/bench_train.py`` trains that configuration at that length for ``--steps`` steps with the length in
the block (so initialize's pre-flight check runs and must pass), and then launches it at the next length of
the chunk's granularity at or past 1.1x, which the pre-flight check must refuse before any step.

A case may name a smaller GPU and host (``gpu_memory_gib``/``host_memory_gib``): the process's caching
allocator is capped at that GPU memory (``torch.cuda.set_per_process_memory_fraction``) and the plan and
initialize are told both facts, so the maximum of a smaller machine is checked on this one. Cases without
them plan for this machine as pynvml and the host report it; a training run the plan predicts past the
time left (a full H200's maximum takes longer than a device call) is not launched and is recorded so, the
refusal check still runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.bench_plan import measured  # noqa: E402
from bench.common import record_header, write_json  # noqa: E402
from bench.models import llama_config, resolve_shape  # noqa: E402


class Case(NamedTuple):
    """A model (a bench/models.py preset or None for the bench's 4-layer default) on a machine."""

    preset: Optional[str]
    gpu_memory_gib: Optional[float] = None  # None: this GPU as pynvml reports it
    host_memory_gib: Optional[float] = None  # None: this host's available memory


CASES: Dict[str, Case] = {
    "bench4l_gpu40": Case(None, 40.0, 48.0),
    # ZeRO's offloaded optimizer of 3.2B parameters alone takes 16 bytes each of host memory
    "3b_gpu40": Case("llama3.2-3b", 40.0, 80.0),
    "3b_gpu48": Case("llama3.2-3b", 48.0, 96.0),
    "bench4l_h200": Case(None),
    "3b_h200": Case("llama3.2-3b"),
    "8b_h200": Case("llama3.1-8b"),
}


def keep_flag(keep) -> str:
    """``bench_train.py``'s ``--keep_attention_output`` of a block's value (true, false or "reruns")."""
    return keep if isinstance(keep, str) else str(int(keep))


def train_flags(ds_config: dict) -> List[str]:
    """``bench_train.py`` flags of a plan's DeepSpeed config (its long_context block, optimizer offload and the
    moments in host memory)."""
    block = ds_config["long_context"]
    flags = ["--ulysses", str(block["ulysses_degree"]), "--ring", str(block["ring_degree"]),
             "--kernel", block["kernel"], "--keep_attention_output", keep_flag(block["keep_attention_output"]),
             "--lean_rms_norm", str(int(block.get("lean_rms_norm", True)))]
    fpdt = block.get("fpdt") or {}
    if fpdt.get("chunk_size"):
        flags += ["--chunk_size", str(fpdt["chunk_size"])]
    if fpdt.get("offload"):
        flags.append("--offload")
    if block.get("checkpoint_layers") is not None:
        flags += ["--checkpoint_layers", str(int(block["checkpoint_layers"]))]
    if block.get("checkpoint_every", 1) != 1:
        flags += ["--checkpoint_every", str(int(block["checkpoint_every"]))]
    offload = block.get("checkpoint_offload")
    if offload is True:
        flags.append("--checkpoint_offload")
    elif offload:
        flags += ["--checkpoint_offload", str(int(offload))]
    for key in ("mlp_tile_tokens", "loss_tile_tokens"):
        if block.get(key):
            flags += [f"--{key}", str(block[key])]
    for key in ("fused_norms", "fused_gated_mlp", "fused_rope"):
        if block.get(key):
            flags.append(f"--{key}")
    if ds_config.get("zero_optimization", {}).get("offload_optimizer"):
        flags.append("--offload_optimizer")
    if block.get("host_optimizer_states"):
        flags.append("--host_optimizer_states")
    return flags


def refused_length(seq_len: int, block: dict) -> int:
    """The first length at or past 1.1 x ``seq_len`` that the block's chunking divides."""
    grain = math.lcm((block.get("fpdt") or {}).get("chunk_size") or 1,
                     block["ulysses_degree"] * block["ring_degree"] * 2)
    return -(-int(seq_len * 1.1) // grain) * grain


def run(cmd: List[str], timeout_s: float) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=max(1.0, timeout_s), capture_output=True, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, exc.stdout or "", f"killed after {timeout_s:.0f} s")
    sys.stdout.write(proc.stdout[-2500:])
    if proc.returncode:
        sys.stdout.write(proc.stderr[-2500:])
    return proc


def bench_train(case: Case, seq_len: int, flags: List[str], steps: int, out: str, timeout_s: float):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29533",
           os.path.join(HERE, "bench_train.py"), "--seq_len", str(seq_len), "--steps", str(steps),
           "--warmup", "1", "--checkpointing", "--block_seq_len", "1", "--out", out,
           *(["--model", case.preset] if case.preset else []), *flags]
    if case.gpu_memory_gib is not None:
        cmd += ["--gpu_memory_gib", str(case.gpu_memory_gib), "--host_memory_gib", str(case.host_memory_gib)]
    proc = run(cmd, timeout_s)
    record = json.load(open(out)) if os.path.exists(out) else None
    return proc, record


def check_case(name: str, case: Case, args, deadline: float) -> dict:
    shape = resolve_shape(case.preset)
    with tempfile.TemporaryDirectory(prefix=f"plan_{name}_") as model_dir:
        llama_config(shape, 1 << 23).save_pretrained(model_dir)
        plan_cmd = [sys.executable, "-m", "ds_longctx.cli", "plan", "--model", model_dir, "--seq-len", "max",
                    "--gpus", "1", "--json"]
        if case.gpu_memory_gib is not None:
            plan_cmd += ["--gpu-memory-gib", str(case.gpu_memory_gib),
                         "--host-memory-gib", str(case.host_memory_gib)]
        proc = run(plan_cmd, 120)
    row = {"case": name, "model": case.preset or "bench 4-layer (Llama-3-8B widths, 256 tokens)",
           "gpu_memory_gib": case.gpu_memory_gib, "host_memory_gib": case.host_memory_gib,
           "plan_command": " ".join(plan_cmd[1:]).replace(model_dir, "CONFIG")}
    if proc.returncode:
        row["plan_error"] = proc.stderr[-1500:]
        return row
    plan = json.loads(proc.stdout)
    row["plan"] = plan
    seq_len, flags = plan["seq_len"], train_flags(plan["ds_config"])
    row["train_flags"] = flags
    tag = f"{args.out_dir}/planmax_{name}"
    # a run is launched only when its predicted time (steps, plus start and build) fits what is left
    predicted_s = args.steps * plan["step_seconds"] + args.overhead_s
    left = deadline - time.monotonic() - args.refusal_s
    if predicted_s > left:
        row["train"] = {"status": "not_run", "reason": f"predicted {predicted_s:.0f} s ({args.steps} steps of "
                        f"{plan['step_seconds']:.0f} s and start), {left:.0f} s left in the call"}
    else:
        t0 = time.monotonic()
        proc, record = bench_train(case, seq_len, flags, args.steps, f"{tag}_{seq_len}.json", left)
        row["train"] = {"status": "ok" if proc.returncode == 0 and record and "oom" not in record
                        and "preflight_refused" not in record else "failed",
                        "returncode": proc.returncode, "wall_s": time.monotonic() - t0,
                        "json": os.path.basename(f"{tag}_{seq_len}.json") if record else None}
        if record is not None:
            row["train"]["measured"] = measured(record) if "steps" in record else {}
            for key in ("oom", "preflight_refused"):
                if key in record:
                    row["train"][key] = record[key]
            meas = row["train"]["measured"]
            if meas.get("gpu_peak_gib"):
                row["train"]["gpu_peak_ratio"] = plan["gpu_peak_gib"] / meas["gpu_peak_gib"]
                row["train"]["step_seconds_ratio"] = plan["step_seconds"] / meas["step_seconds"]
                if meas.get("host_pinned_gib"):
                    row["train"]["host_pinned_ratio"] = plan["host_pinned_gib"] / meas["host_pinned_gib"]
        else:
            row["train"]["stderr"] = proc.stderr[-1500:]
    longer = refused_length(seq_len, plan["ds_config"]["long_context"])
    proc, record = bench_train(case, longer, flags, 1, f"{tag}_{longer}.json",
                               max(30.0, deadline - time.monotonic()))
    refused = record is not None and "preflight_refused" in record
    row["longer"] = {"seq_len": longer, "refused": refused, "returncode": proc.returncode,
                     "message": record.get("preflight_refused") if refused else None,
                     **({} if refused else {"stderr": proc.stderr[-1500:],
                                             "trained": bool(record and record.get("steps"))})}
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="bench4l_gpu40,3b_gpu40", help=f"comma-separated, of {sorted(CASES)}")
    ap.add_argument("--steps", type=int, default=2, help="steps at the maximum (the second is steady state)")
    ap.add_argument("--budget-s", dest="budget_s", type=float, default=540.0)
    ap.add_argument("--overhead-s", dest="overhead_s", type=float, default=60.0,
                    help="a launch's seconds outside the steps (start, model build, initialize)")
    ap.add_argument("--refusal-s", dest="refusal_s", type=float, default=40.0,
                    help="seconds kept for each case's refusal check")
    ap.add_argument("--out-dir", dest="out_dir", default=os.environ.get("OUT", "."))
    ap.add_argument("--commit", default="")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}: known {sorted(CASES)}")
    deadline = time.monotonic() + args.budget_s
    payload = record_header(1, args.commit)
    payload.update(command=" ".join(sys.argv), steps=args.steps, cases=[])
    for name in names:
        payload["cases"].append(check_case(name, CASES[name], args, deadline))
        write_json(os.path.join(args.out_dir, "plan_max_summary.json"), payload)
    for row in payload["cases"]:
        train = row.get("train", {})
        print(f"{row['case']:<16} max {row.get('plan', {}).get('seq_len')}  train {train.get('status')} "
              f"gpu x{train.get('gpu_peak_ratio', float('nan')):.3f}  longer {row.get('longer', {}).get('seq_len')} "
              f"refused {row.get('longer', {}).get('refused')}", flush=True)


if __name__ == "__main__":
    main()
