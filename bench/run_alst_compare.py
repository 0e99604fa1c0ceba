"""Plain ZeRO-3, DeepSpeed's ALST recipe and ds_longctx side by side at growing sequence lengths, in one
device call: each (length, variant) is one ``bench_train.py`` launch writing its JSON under ``--out-dir``.

    python bench/run_alst_compare.py --model llama3.2-3b --lengths 65536,131072,262144 --budget-s 540 \\
        --out-dir $OUT --commit $(git rev-parse --short HEAD)
    python bench/run_alst_compare.py --model llama3.1-8b --layers 4 --lengths 131072,262144,524288,1048576 ...

Lengths run in increasing order, every variant at a length before the next length. A variant that runs out
of memory (or fails, or is stopped by the budget) is not launched at longer lengths. Before a launch the
driver predicts its time from the variant's previous length: the seconds outside the steps (start, model
build, DeepSpeed's initialize) plus its slowest step x (S / S_prev)^2 (attention dominates) x steps; a run
predicted past the time left of ``--budget-s`` is skipped, and a launch never runs past it (it is killed,
and recorded so). ``<prefix>_summary.json`` lists every (length, variant): its status, the predicted and
the measured seconds, and the JSON written.

Variants (``--variants``; ``--variant NAME='flags'`` adds or replaces one): ``deepspeed`` (plain ZeRO-3 with
transformers' gradient checkpointing and cuDNN SDPA), ``alst`` (``--mode alst``, cuDNN SDPA),
``ds_longctx`` (cuDNN kernel, FPDT chunks offloaded, checkpoints offloaded, tiled MLP and loss) and
``ds_longctx_fa4`` (the same with the ``auto`` kernel: FlashAttention-4 where installed), ``ds_longctx_plan``
(the configuration ``ds-longctx plan`` chooses for the length on this machine, cuDNN kernel; its plan JSON is
kept as ``<prefix>plan_<model>_<S>.json``) and ``ds_longctx_plan_fa4`` (the same with the ``auto`` kernel);
``ds_longctx_lean*`` the fastest plan within ``ALST_SHARE`` of ALST's measured peak; ``*_fused`` with the norms in
compiled kernels, ``*_fusedmlp`` with the MLP's gating compiled too, ``*_fusedall`` with the rotary embedding
too. ``{chunk}`` in
flags is the FPDT chunk: ``min(65536, S)``. Every run gets ``PYTORCH_CUDA_ALLOC_CONF`` of ``--alloc-conf``
(expandable segments, as ALST's authors run).

``--probe-layers K`` runs fit probes instead of training (``bench_train.py --probe_layers K``, see
``bench/fit_probe.py``): each launch is one whole step at 4,096 tokens (the optimizer's state) and one step at
the length stopped after K decoder layers' backward, whose GPU peak is the whole step's; so the sweep finds
the longest length that fits at lengths where a whole step would outlast the device call. The prediction
then scales the probe's seconds (the warm-up step counts as time outside the steps).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.fit_probe import is_warm_step  # noqa: E402

DS_LONGCTX = ("--mode ds_longctx --checkpointing --mlp_tile_tokens 16384 --loss_tile_tokens 4096 --offload "
              "--checkpoint_offload --chunk_size {chunk}")
# {plan}: the configuration ``ds-longctx plan`` chooses for the model at the length on this machine (for the
# variant's kernel); {plan_within_alst}: the fastest one whose predicted GPU peak is within ALST_SHARE of ALST's
# measured peak at that length (ALST runs first)
PLANNED = "--mode ds_longctx --checkpointing {plan}"
PLANNED_WITHIN_ALST = "--mode ds_longctx --checkpointing {plan_within_alst}"
#: the GPU-memory target against ALST is 0.7x its peak; plans aim 2% under it (the planner's peaks were
#: within 1-2% of the measured ones on this machine)
ALST_SHARE = 0.68
ALL_FUSED = "--fused_norms --fused_gated_mlp --fused_rope"
VARIANTS: Dict[str, str] = {
    "deepspeed": "--mode deepspeed --checkpointing --ds_sdpa cudnn",
    "alst": "--mode alst --checkpointing --ds_sdpa cudnn",
    "ds_longctx": DS_LONGCTX + " --kernel sdpa_cudnn",
    "ds_longctx_fa4": DS_LONGCTX + " --kernel auto",
    "ds_longctx_plan": PLANNED + " --kernel sdpa_cudnn",
    "ds_longctx_plan_fa4": PLANNED + " --kernel auto",
    "ds_longctx_lean": PLANNED_WITHIN_ALST + " --kernel sdpa_cudnn",
    "ds_longctx_lean_fa4": PLANNED_WITHIN_ALST + " --kernel auto",
    "ds_longctx_plan_fused": PLANNED + " --kernel sdpa_cudnn --fused_norms",
    "ds_longctx_lean_fused": PLANNED_WITHIN_ALST + " --kernel sdpa_cudnn --fused_norms",
    "ds_longctx_plan_fusedmlp": PLANNED + " --kernel sdpa_cudnn --fused_norms --fused_gated_mlp",
    "ds_longctx_lean_fusedmlp": PLANNED_WITHIN_ALST + " --kernel sdpa_cudnn --fused_norms --fused_gated_mlp",
    "ds_longctx_plan_fusedall": PLANNED + " --kernel sdpa_cudnn " + ALL_FUSED,
    "ds_longctx_lean_fusedall": PLANNED_WITHIN_ALST + " --kernel sdpa_cudnn " + ALL_FUSED,
}
STOPS = ("oom", "killed", "failed", "timeout", "over_budget")  # statuses after which longer lengths are skipped


class RunResult(NamedTuple):
    """What one launch gave: ``status`` ok / oom / killed / failed / timeout, its wall time, its steps' seconds,
    the JSON it wrote (None if none) and a note (the error or the out-of-memory message)."""

    status: str
    wall_s: float
    step_seconds: List[float]
    path: Optional[str]
    note: str = ""


def failure(returncode: int, stderr: str) -> tuple:
    """``(status, note)`` of a launch that exited with an error and no out-of-memory record: ``killed`` when a
    rank died of SIGKILL, which no Python error precedes (on a host whose memory is full, the kernel's
    out-of-memory killer: pinned memory cannot be swapped), else ``failed``."""
    if returncode in (-9, 137) or "Signal 9 (SIGKILL)" in stderr:
        return "killed", (f"rc {returncode}: a rank was killed by SIGKILL with no Python error (most likely the "
                          f"kernel's out-of-memory killer: host memory full): {stderr[-600:]}")
    return "failed", f"rc {returncode}: {stderr[-1500:]}"


def predict_s(prev: RunResult, prev_len: int, seq_len: int, steps: int) -> float:
    """Seconds a run of ``steps`` steps at ``seq_len`` takes, from a finished run at ``prev_len``."""
    outside = max(0.0, prev.wall_s - sum(prev.step_seconds))
    return outside + max(prev.step_seconds) * (seq_len / prev_len) ** 2 * steps


def sweep(lengths: List[int], variants: List[str], steps: int, budget_s: float,
          launch: Callable[[str, int, float], RunResult], clock: Callable[[], float] = time.monotonic,
          min_launch_s: float = 30.0) -> List[Dict]:
    """Run ``launch(variant, seq_len, timeout_s)`` for every length (increasing) and variant within
    ``budget_s`` seconds of ``clock``; returns one record per (length, variant), launched or not."""
    start = clock()
    stopped: Dict[str, str] = {}
    last_ok: Dict[str, tuple] = {}
    records = []
    for seq_len in sorted(lengths):
        for v in variants:
            rec = {"variant": v, "seq_len": seq_len}
            records.append(rec)
            if v in stopped:
                rec.update(status="skipped", reason=f"{stopped[v]} at a shorter length")
                continue
            left = budget_s - (clock() - start)
            if v in last_ok:
                prev_len, prev = last_ok[v]
                rec["predicted_s"] = predict_s(prev, prev_len, seq_len, steps)
                if rec["predicted_s"] > left:
                    rec.update(status="over_budget", left_s=left)
                    stopped[v] = "over_budget"
                    continue
            if left < min_launch_s:
                rec.update(status="over_budget", left_s=left)
                stopped[v] = "over_budget"
                continue
            res = launch(v, seq_len, left)
            rec.update(status=res.status, wall_s=res.wall_s, json=res.path, note=res.note,
                       step_seconds=res.step_seconds)
            if res.status in STOPS:
                stopped[v] = res.status
            else:
                last_ok[v] = (seq_len, res)
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_kernel(spec: str) -> str:
    """The kernel a variant's flags name (the last ``--kernel``), ``auto`` when none."""
    words = shlex.split(spec)
    named = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--kernel"]
    return named[-1] if named else "auto"


def variant_flags(spec: str, seq_len: int, planned: Optional[Callable[..., List[str]]] = None,
                  alst_peak_gib: Optional[Callable[[int], float]] = None) -> List[str]:
    """A variant's bench_train flags at ``seq_len``: ``{chunk}`` the FPDT chunk, ``{plan}`` the flags of
    ``planned(seq_len, kernel)`` for the variant's kernel (later flags override the plan's), and
    ``{plan_within_alst}`` those of the plan on a GPU of ``ALST_SHARE x alst_peak_gib(seq_len)``."""
    kernel = spec_kernel(spec)
    plan = within = ""
    if planned is not None and "{plan}" in spec:
        plan = shlex.join(planned(seq_len, kernel))
    if planned is not None and "{plan_within_alst}" in spec:
        within = shlex.join(planned(seq_len, kernel, gpu_gib=ALST_SHARE * alst_peak_gib(seq_len)))
    return shlex.split(spec.format(chunk=min(65536, seq_len), plan=plan, plan_within_alst=within))


def make_planner(args) -> Callable[[int], List[str]]:
    """``ds-longctx plan`` for the sweep's model at a length on this machine (pynvml, the host's available
    memory): its JSON is kept under ``--out-dir``, its configuration returned as bench_train flags. Raises
    ``RuntimeError`` with the plan's reason when nothing fits."""
    from bench.bench_plan_max import train_flags
    from bench.models import llama_config, resolve_shape

    def planned(seq_len: int, kernel: str = "auto", gpu_gib: Optional[float] = None) -> List[str]:
        # a GPU budget is the whole budget: no margin taken off it
        budget = ["--gpu-memory-gib", f"{gpu_gib:.2f}", "--gpu-margin-gib", "0"] if gpu_gib is not None else []
        with tempfile.TemporaryDirectory(prefix="alstcmp_model_") as model_dir:
            llama_config(resolve_shape(args.model, layers=args.layers), seq_len).save_pretrained(model_dir)
            cmd = [sys.executable, "-m", "ds_longctx.cli", "plan", "--model", model_dir, "--seq-len", str(seq_len),
                   "--gpus", str(args.gpus), "--kernel", kernel, "--json", *budget, *shlex.split(args.plan_flags)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"ds-longctx plan: {proc.stderr.strip()[-600:]}")
        plan = json.loads(proc.stdout)
        model = args.model + (f"_{args.layers}l" if args.layers else "")
        tag = ("" if kernel == "sdpa_cudnn" else f"_{kernel}") + ("_within_alst" if gpu_gib is not None else "")
        with open(os.path.join(args.out_dir, f"{args.prefix}plan_{model}_{seq_len}{tag}.json"), "w") as f:
            json.dump(plan, f, indent=1)
        return train_flags(plan["ds_config"])
    return planned


PROBE_WARM_SEQ_LEN = 4096  # a probe's whole warm-up step: short, so its time hardly counts


def scaling_seconds(record: Dict) -> List[float]:
    """The seconds of a bench_train record's steps that grow with the length: every step, except a fit probe's
    warm-up step (at a fixed short length)."""
    return [r["seconds"] for r in record.get("steps", []) if not is_warm_step(r)]


def step_flags(probe_layers: int, warm_seq_len: int = 0) -> List[str]:
    """bench_train flags of a run's steps: a fit probe of ``probe_layers`` layers' backward (after a warm-up
    step at ``PROBE_WARM_SEQ_LEN``), or for 0 training steps (after one at ``warm_seq_len``, if any)."""
    if not probe_layers:
        return ["--warm_seq_len", str(warm_seq_len)] if warm_seq_len else []
    return ["--probe_layers", str(probe_layers), "--warm_seq_len", str(PROBE_WARM_SEQ_LEN)]


def make_launcher(args, variants: Dict[str, str]) -> Callable[[str, int, float], RunResult]:
    """A ``launch`` for ``sweep`` running ``bench_train.py`` under torchrun with ``args.gpus`` ranks."""
    model = args.model + (f"_{args.layers}l" if args.layers else "")
    planned = make_planner(args) if not args.dry_run else lambda seq_len, *a, **k: [f"<plan at {seq_len}>"]

    def alst_peak_gib(seq_len: int) -> float:
        """ALST's steady GPU peak at ``seq_len`` from its JSON of this sweep or of ``--have``."""
        name = f"{args.prefix}_alst_{model}_{seq_len}.json"
        for folder in (args.out_dir, args.have):
            path = os.path.join(folder, name) if folder else None
            if path and os.path.exists(path):
                steady = (json.load(open(path)).get("summary") or {}).get("steady_peak_gib")
                if steady:
                    return float(steady)
        if args.dry_run:
            return float("nan")
        raise LookupError(f"no steady ALST peak at {seq_len} tokens ({name}): run the alst variant first")
    probe_layers = getattr(args, "probe_layers", 0)

    def launch(variant: str, seq_len: int, timeout_s: float) -> RunResult:
        out = os.path.join(args.out_dir, f"{args.prefix}_{variant}_{model}_{seq_len}.json")
        have = os.path.join(args.have, os.path.basename(out)) if args.have else None
        if have and os.path.exists(have):  # measured in an earlier call: not run again
            d = json.load(open(have))
            # a probe stands for a probe, a trained run for a trained run (their seconds differ)
            same_kind = bool(d.get("probe_layers")) == bool(probe_layers)
            if not d.get("partial") and "oom" not in d and d.get("steps") and same_kind:
                seconds = scaling_seconds(d)
                # its start is not recorded: a minute, about what a full-depth model's start and build take
                return RunResult("ok", sum(seconds) + 60.0, seconds, have, "measured earlier")
        t0 = time.monotonic()
        try:
            flags = variant_flags(variants[variant], seq_len, planned, alst_peak_gib)
        except RuntimeError as exc:  # the planner found nothing that fits: the variant stops here
            return RunResult("oom", time.monotonic() - t0, [], None, str(exc))
        except LookupError as exc:  # its GPU budget comes from a run that is missing
            return RunResult("failed", time.monotonic() - t0, [], None, str(exc))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus),
               "--master_port", str(free_port()), os.path.join(HERE, "bench_train.py"),
               "--model", args.model, "--seq_len", str(seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--label", variant, "--commit", args.commit, "--out", out,
               *(["--layers", str(args.layers)] if args.layers else []),
               *flags, *step_flags(probe_layers, getattr(args, "warm_seq_len", 0)), *shlex.split(args.extra)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.alloc_conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
        print("+", " ".join(cmd), flush=True)
        if args.dry_run:
            return RunResult("ok", 0.0, [0.0], None, "dry run")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            # the steps finished before the kill are in its JSON (bench_train writes it after every step)
            done = scaling_seconds(json.load(open(out))) if os.path.exists(out) else []
            return RunResult("timeout", time.monotonic() - t0, done,
                             out if os.path.exists(out) else None, f"killed after {timeout_s:.0f} s: the budget's end")
        wall = time.monotonic() - t0
        sys.stdout.write(proc.stdout[-3000:])
        if not os.path.exists(out):  # a rank out of memory alone writes its own record
            others = [f"{out}.rank{r}" for r in range(1, args.gpus) if os.path.exists(f"{out}.rank{r}")]
            if not others:
                status, note = failure(proc.returncode, proc.stderr)
                return RunResult(status, wall, [], None, note)
            out = others[0]
        d = json.load(open(out))
        seconds = scaling_seconds(d)
        if "oom" in d:
            return RunResult("oom", wall, seconds, out, f"{d['oom'].get('kind')}: {d['oom']['error'][:300]}")
        if proc.returncode != 0:
            status, note = failure(proc.returncode, proc.stderr)
            return RunResult(status, wall, seconds, out, note)
        return RunResult("ok", wall, seconds, out)
    return launch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a bench/models.py preset")
    ap.add_argument("--layers", type=int, default=None, help="a slice of this many layers (default: full depth)")
    ap.add_argument("--lengths", required=True, help="comma-separated sequence lengths")
    ap.add_argument("--variants", default="deepspeed,alst,ds_longctx,ds_longctx_fa4")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="add or replace a variant: bench_train.py flags ({chunk}: the FPDT chunk)")
    ap.add_argument("--extra", default="", help="flags for every run, e.g. --offload_optimizer")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--plan-flags", dest="plan_flags", default="",
                    help="more ds-longctx plan flags for the {plan} variants, e.g. --host-memory-gib 100")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget-s", dest="budget_s", type=float, required=True,
                    help="seconds for the whole sweep (a device call's limit less a margin)")
    ap.add_argument("--out-dir", dest="out_dir", default=os.environ.get("OUT", "."))
    ap.add_argument("--prefix", default="alstcmp")
    ap.add_argument("--commit", default="")
    ap.add_argument("--alloc-conf", dest="alloc_conf", default="expandable_segments:True")
    ap.add_argument("--have", default="",
                    help="a folder of earlier results (e.g. bench/results): a run whose complete JSON is there is "
                         "not launched again, its steps count for the next length's prediction")
    ap.add_argument("--probe-layers", dest="probe_layers", type=int, default=0,
                    help="fit probes: each run a whole step at 4096 tokens, then a step at the length stopped after "
                         "this many decoder layers' backward (its GPU peak is the step's); sets --steps 1 "
                         "--warmup 0. 0: train")
    ap.add_argument("--warm-seq-len", dest="warm_seq_len", type=int, default=0,
                    help="training runs: one whole step at this length first, left out of the rates, so the "
                         "first step at the length already has the optimizer's state (with --steps 1 --warmup 0: "
                         "one steady step, where two full-depth steps take longer than a device call). 0: none")
    ap.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    if args.probe_layers:  # one probe step per run: its backward is stopped, so nothing follows it
        args.steps, args.warmup = 1, 0
    variants = dict(VARIANTS)
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        variants[name] = flags
    chosen = [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        ap.error(f"unknown variants {unknown}: known {sorted(variants)}")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    os.makedirs(args.out_dir, exist_ok=True)
    records = sweep(lengths, chosen, args.steps, args.budget_s, make_launcher(args, variants))
    summary = {"model": args.model, "layers": args.layers, "gpus": args.gpus, "steps": args.steps,
               "probe_layers": args.probe_layers,
               "budget_s": args.budget_s, "variants": {v: variants[v] for v in chosen}, "extra": args.extra,
               "command": " ".join(sys.argv), "runs": records}
    path = os.path.join(args.out_dir, f"{args.prefix}_summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    for r in records:
        print(f"{r['seq_len']:>9} {r['variant']:<16} {r['status']:<12} "
              f"{r.get('wall_s', 0):7.0f} s  predicted {r.get('predicted_s', float('nan')):7.0f} s  "
              f"{r.get('note', r.get('reason', ''))[:120]}", flush=True)
    print("summary:", path)


if __name__ == "__main__":
    main()
