"""Render the committed benchmark JSON under bench/results/ as Markdown tables (the numbers in README and
docs come from here).

    python bench/report.py > docs/results.md
"""
from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(pattern):
    return [(os.path.basename(p), json.load(open(p))) for p in sorted(glob.glob(os.path.join(HERE, pattern)))]


def header(name, d):
    v = d["versions"]
    gpus = d.get("gpus") or ["?"]
    # settings of the run that live in the environment, not the command line (the allocator's, for one)
    env = "".join(f"{k}={v} " for k, v in d.get("env", {}).items() if k == "PYTORCH_CUDA_ALLOC_CONF")
    return (f"**`bench/results/{name}`**: {len(gpus)} x {gpus[0]}, torch {v['torch']}, cuDNN {v.get('cudnn')}, "
            f"deepspeed {v.get('deepspeed')}, commit `{d.get('commit')}`, {d['date']}  \n"
            f"`{env}{d['command']}`\n")


def f(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def attention_tables():
    out = []
    for name, d in load("attention_*.json"):
        out.append(header(name, d))
        out.append(f"Kernel `{d['kernel_requested']}` resolved to `{d['kernel_resolved']}`; Llama-3-8B heads "
                   f"({d['heads']} q, {d['kv_heads']} kv, D={d['head_dim']}), causal, bf16, fwd+bwd.\n")
        out.append("| impl | kernel | total tokens | tokens/GPU | ms | TFLOP/s/GPU | x same kernel on 1 GPU | "
                   "x cuDNN on 1 GPU | x DeepSpeed Ulysses (cuDNN) | spread |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in d["results"]:
            if r.get("oom"):
                out.append(f"| {r['impl']} | {r['kernel']} | {r['total_tokens']} | {r['tokens_per_gpu']} | OOM ||||||")
                continue
            out.append(f"| {r['impl']} | {r['kernel']} | {r['total_tokens']} | {r['tokens_per_gpu']} | "
                       f"{r['fwd_bwd_ms']:.1f} | {r['tflops_per_gpu']:.1f} | "
                       f"{'' if r['impl'] == 'deepspeed' else f(r.get('vs_single_gpu_kernel'))} | "
                       f"{f(r.get('vs_single_gpu_cudnn'))} | {f(r.get('vs_deepspeed_ulysses_cudnn'))} | "
                       f"{f(r.get('spread'))} |")
        if any("spread" in r for r in d["results"]):
            out.append(f"\nTimed in rounds ({d['results'][0].get('rounds')} per length, each implementation once "
                       "per round in the order above, one set of inputs); *spread* = (max - min) / median of a "
                       "row's round times; `single#2` is the kernel timed again at the end of each round.")
        chk = d.get("kernel_check", {})
        if chk:
            out.append("\nKernel check against the fp32 reference kernel (relative error, bf16 inputs, S=2048):\n")
            out.append("| kernel | case | out | lse | dq | dk | dv |")
            out.append("|---|---|---|---|---|---|---|")
            for k, cases in chk.items():
                for case, e in cases.items():
                    if case == "error":
                        out.append(f"| {k} | error: {e} ||||||")
                        continue
                    out.append(f"| {k} | {case} | " + " | ".join(f(e.get(n), ".1e") for n in
                                                                ("out", "lse", "dq", "dk", "dv")) + " |")
        out.append("")
    return out


def fpdt_tables():
    out = []
    for name, d in load("fpdt_*.json"):
        out.append(header(name, d))
        out.append(f"Topology ulysses={d['ulysses']} x ring={d['ring']}, kernel `{d['kernel_resolved']}`, one "
                   f"attention layer fwd+bwd, Llama-3-8B heads, causal, bf16. GiB from the CUDA caching "
                   f"allocator; *state* = peak minus the layer's inputs (q, k, v, dout) and what it must return "
                   f"(out, dq, dk, dv); *retained* = what the layer's graph holds between forward and backward, "
                   f"beyond its output.\n")
        ex = d.get("exactness_bf16_vs_unchunked", {})
        if ex:
            worst = max(max(e.values()) for e in ex.values())
            out.append(f"Exactness: chunked and offloaded against unchunked, bf16, worst relative error over "
                       f"out/dq/dk/dv and {len(ex)} settings: {worst:.1e}.\n")
        if d.get("memory"):
            out.append("| mode | total tokens | peak GiB | state GiB | retained GiB | host allocations, 1st / later steps |")
            out.append("|---|---|---|---|---|---|")
            for r in d["memory"]:
                if r["oom"]:
                    out.append(f"| {r['mode']} | {r['total_tokens']} | OOM ||||")
                    continue
                later = r.get("host_allocations_later_steps")
                out.append(f"| {r['mode']} | {r['total_tokens']} | {r['peak_gib']:.2f} | {r['state_gib']:.2f} | "
                           f"{r['retained_after_forward_gib']:.2f} | {r['host_allocations_first_step']}"
                           f"{'' if later is None else f' / {later}'} |")
            out.append("")
        if d.get("throughput"):
            out.append("| mode | total tokens | ms | TFLOP/s/GPU | x unchunked | peak GiB | state GiB |")
            out.append("|---|---|---|---|---|---|---|")
        for r in d.get("throughput", []):
            if "fwd_bwd_ms" not in r:
                continue
            out.append(f"| {r['mode']} | {r['total_tokens']} | {r['fwd_bwd_ms']:.1f} | {r['tflops_per_gpu']:.1f} | "
                       f"{f(r.get('vs_unchunked'))} | {r['peak_gib']:.2f} | {r['state_gib']:.2f} |")
        ov = d.get("overlap_trace")
        if ov:
            out.append(f"\nCUDA trace of one fwd+bwd, offload, {ov['total_tokens']} tokens, chunk {ov['chunk_size']} "
                       f"(kernels busy {ov['kernel_busy_ms']:.0f} ms of a {ov['span_ms']:.0f} ms span):\n")
            out.append("| copies | count | GiB | copy ms | ms overlapped with kernels | overlapped | GB/s |")
            out.append("|---|---|---|---|---|---|---|")
            for kind in ("HtoD", "DtoH"):
                c = ov[kind]
                out.append(f"| {kind} | {c['copies']} | {c['gib']:.2f} | {c['copy_ms']:.1f} | "
                           f"{c['overlapped_with_kernels_ms']:.1f} | {f(c['overlap_fraction'])} | "
                           f"{f(c['gb_per_s_while_copying'], '.1f')} |")
        out.append("")
    return out


def documents_tables():
    out = []
    for name, d in load("documents_*.json"):
        out.append(header(name, d))
        out.append(f"{d['world_size']} GPU(s), topology {d['topology']}, kernel `{d['kernel_requested']}` resolved to "
                   f"`{d['kernel_resolved']}`, {d['seq']} tokens packed with documents of the given length, "
                   f"Llama-3-8B heads, causal, bf16, fwd+bwd. TFLOP/s count the attention inside each document "
                   f"(`unpacked`: across the whole sequence). Exactness of `packed` against attending document "
                   f"by document with the same kernel: " + ", ".join(f"{k} {v:.1e}" for k, v in
                                                                       d["exactness"].items()) + ".\n")
        out.append("| impl | doc length | documents | ms | TFLOP/s/GPU | x FA4 varlen | time of unpacked / this | spread |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in d["results"]:
            if r.get("oom"):
                out.append(f"| {r['impl']} | {r['doc_len']} | {r['documents']} | OOM |||||")
                continue
            out.append(f"| {r['impl']} | {r['doc_len']} | {r['documents']} | {r['fwd_bwd_ms']:.1f} | "
                       f"{r['tflops_per_gpu']:.1f} | {'' if r['impl'] == 'unpacked' else f(r.get('vs_fa4_varlen'))} | "
                       f"{f(r.get('time_vs_unpacked'))} | "
                       f"{f(r.get('spread'))} |")
        out.append("")
    return out


def train_tables():
    rows = load("train_*.json")
    if not rows:
        return []
    out = ["| file | mode | GPUs | seq_len | layers | params | optimizer | vocab | attention | grad. checkpointing | "
           "MLP tiles | loss tiles | tokens/s | model TFLOP/s/GPU | peak GiB | GiB left for backward | loss per step |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in rows:
        lc = d["ds_config"].get("long_context")
        if d["mode"] == "deepspeed":
            attn = f"transformers SDPA ({d.get('ds_sdpa', 'default')})"
        else:
            attn = (f"{lc['ulysses_degree']}x{lc['ring_degree']}, "
                    f"kernel {d['kernel']}" + (f" ({d['kernel_resolved']})" if "kernel_resolved" in d else
                                               " (flash-attn absent: sdpa_cudnn)" if d["kernel"] == "auto"
                                               and d["versions"].get("flash_attn") == "absent" else "")
                    + f", chunk {d['chunk_size']}, offload {d['offload']}"
                    # runs before the option existed had the models' own norms
                    + (", lean RMSNorm" if lc.get("lean_rms_norm") else ""))
        ckpt = str(d["checkpointing"])
        if d["checkpointing"] and lc is not None:
            ckpt += ", attention kept" if lc.get("keep_attention_output", False) else ", attention recomputed"
            if lc.get("checkpoint_offload"):
                ckpt += ", checkpoints in host memory"
        tiles = (lc or {}).get("mlp_tile_tokens") or "-"
        loss_tiles = (lc or {}).get("loss_tile_tokens") or "-"
        s = d.get("summary") or {}
        losses = ", ".join(format(r["loss"], ".3f") for r in d["steps"])
        res = ("OOM" if "oom" in d else f"fits (probe: {s['probe_layers']} layers' backward)" if "probe_peak_gib" in s
               else f"{s.get('tokens_per_s', 0):,.0f}")
        peak = (f"{d['oom']['peak_gib']:.1f} at OOM" if "oom" in d else
                f(s.get("probe_peak_gib", s.get("peak_gib")), ".1f"))
        left = d["steps"][-1].get("after_forward_gib") if d["steps"] else None  # added to the bench later
        optim = "CPU" if d.get("offload_optimizer") else "GPU"
        out.append(f"| `{name}` | {d['mode']} | {d['world_size']} | {d['seq_len']} | {d['layers']} | "
                   f"{d['params'] / 1e9:.2f}B | {optim} | {d.get('vocab', 256)} | {attn} | {ckpt} | {tiles} | "
                   f"{loss_tiles} | {res} | {f(s.get('tflops_per_gpu'), '.1f')} | {peak} | {f(left, '.1f')} | "
                   f"{losses or '-'} |")
    out.append("")
    for name, d in rows:
        out.append(header(name, d))
    return out


def long_sequence_tables(rows=None):
    """Plain ZeRO-3, ALST and ds_longctx at growing lengths (``bench/run_alst_compare.py``): per model, each run
    label's rate, GPU peak and host memory by length, then the longest length each label trained."""
    if rows is None:
        rows = [(n, d) for n, d in load("alstcmp_*.json") if not n.endswith("_summary.json")]
    if not rows:
        return []
    from bench.models import run_model_name

    by_model = {}
    for name, d in sorted(rows, key=lambda r: (r[1]["seq_len"], r[1].get("label") or r[1]["mode"])):
        by_model.setdefault(run_model_name(d), []).append((name, d))
    out = ["Every row a measured run (none predicted); GPU peak: the largest of the steps after the first; host "
           "memory: the offloaded checkpoints (alst), the offload pool (ds_longctx), the pinned memory torch's "
           "host allocator held plus the pool's page-locked bytes (all; earlier runs: the allocator alone, which then "
           "held the pool's buffers).\n"]
    if any(d.get("probe_layers") for _, d in rows):
        out.append("*fits (probe: K layers' backward)*: a fit probe (`bench_train.py --probe_layers K`), a step at "
                   "the length stopped after its first K decoder layers' backward (after a whole step at a short "
                   "length, so the optimizer's state is there): every layer's backward has the same working set and "
                   "the first includes the loss's, so its GPU peak is the whole step's forward and backward "
                   "(docs/benchmarks.md); the peak shown is the larger of it and the warm-up step's, whose optimizer "
                   "step (no activations left by then) is the one phase the probe never reaches. It "
                   "trained nothing, so it has no rate and counts only under *longest that fits (probe)*.\n")
    for model, runs in by_model.items():
        out.append(f"**{model}** ({runs[0][1]['params'] / 1e9:.2f}B parameters, vocabulary {runs[0][1]['vocab']}, "
                   f"{runs[0][1]['world_size']} GPU)\n")
        out.append("| run | seq_len | tokens/s | model TFLOP/s/GPU | GPU peak GiB | offloaded host GiB | "
                   "pinned host GiB | loss per step | file |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        longest, first_oom, fits = {}, {}, {}
        for name, d in runs:
            label = d.get("label") or d["mode"]
            s = d.get("summary") or {}
            losses = ", ".join(format(r["loss"], ".3f") for r in d["steps"]) or "-"
            if "oom" in d:
                first_oom.setdefault(label, d["seq_len"])
                where = f", {d['oom']['phase']}" if d["oom"].get("phase") else ""
                probe = ", probe" if d.get("probe_layers") else ""
                out.append(f"| {label} | {d['seq_len']} | OOM ({d['oom'].get('kind', 'gpu')}, step "
                           f"{d['oom']['step']}{where}{probe}, {f(d['oom'].get('peak_gib'), '.1f')} GiB) |||||"
                           f"{losses} | `{name}` |")
                continue
            if d.get("probe_layers") and "probe_peak_gib" in s:
                fits[label] = max(fits.get(label, 0), d["seq_len"])
                host = s.get("probe_host_pinned_gib", s.get("probe_host_pool_gib"))
                # the warm-up step's peak covers the optimizer step, which the probe never reaches
                gpu = max(s["probe_peak_gib"], s.get("peak_gib", 0.0))
                out.append(f"| {label} | {d['seq_len']} | fits (probe: {s['probe_layers']} layers' backward) | | "
                           f"{f(gpu, '.1f')} | {f(host, '.1f')} | "
                           f"{f(s.get('probe_host_pinned_total_gib'), '.1f')} | {losses} | `{name}` |")
                continue
            if d["steps"] and not s and not d.get("partial"):  # its only steps were warm-up steps: no steady rate
                first = d["steps"][0]
                longest[label] = max(longest.get(label, 0), d["seq_len"])  # it trained: one whole step
                out.append(f"| {label} | {d['seq_len']} | first step only: {first['seconds']:.1f} s "
                           f"({first['tokens_per_s']:,.0f} tokens/s, warm-up included) | | "
                           f"{f(first.get('peak_gib'), '.1f')} (first step: no optimizer state yet) | | | "
                           f"{losses} | `{name}` |")
                continue
            if d.get("partial"):  # stopped from outside (a device call's end) after these steps
                out.append(f"| {label} | {d['seq_len']} | stopped after {len(d['steps'])} step(s) of "
                           f"{', '.join(format(r['seconds'], '.0f') for r in d['steps'])} s |||||{losses} | `{name}` |")
                continue
            longest[label] = max(longest.get(label, 0), d["seq_len"])
            host = s.get("steady_host_pinned_gib", s.get("steady_host_pool_gib"))
            gpu = s.get("steady_peak_gib", s.get("peak_gib"))  # one step: no steady state, its own peak
            # the pool page-locks its own buffers: torch's allocator plus the pool (older runs: the allocator alone,
            # which then held the pool's buffers)
            pinned = s.get("steady_host_pinned_total_gib", s.get("steady_host_pinned_allocator_gib"))
            out.append(f"| {label} | {d['seq_len']} | {f(s.get('tokens_per_s'), ',.0f')} | "
                       f"{f(s.get('tflops_per_gpu'), '.1f')} | {f(gpu, '.1f')} | {f(host, '.1f')} | "
                       f"{f(pinned, '.1f')} | {losses} | `{name}` |")
        probes = any(d.get("probe_layers") for _, d in runs)  # the probes' column only where there are probes
        out.append("\n| run | longest trained | first out of memory |" + (" longest that fits (probe) |" if probes
                                                                        else ""))
        out.append("|---|---|---|" + ("---|" if probes else ""))
        for label in sorted(set(longest) | set(first_oom) | set(fits)):
            out.append(f"| {label} | {longest.get(label, '-')} | {first_oom.get(label, 'none run')} |"
                       + (f" {fits.get(label, '-')} |" if probes else ""))
        out.append("")
        out.extend(against_alst(runs))
    for name, d in rows:
        out.append(header(name, d))
    return out


def against_alst(runs) -> list:
    """Each ds_longctx run against ALST's at the same length (both with a steady step): tokens/s and steady GPU
    peak as ratios, with the targets of the comparison (>= 1.3x the rate, <= 0.7x the peak)."""
    steady = {}
    for _, d in runs:
        s = d.get("summary") or {}
        if "oom" not in d and not d.get("probe_layers") and s.get("tokens_per_s"):
            steady[(d.get("label") or d["mode"], d["seq_len"])] = s
    pairs = [(label, n) for (label, n) in sorted(steady, key=lambda k: (k[1], k[0]))
             if label.startswith("ds_longctx") and ("alst", n) in steady]
    if not pairs:
        return []
    out = ["| run | seq_len | tokens/s vs ALST (target >= 1.30) | GPU peak vs ALST (target <= 0.70) |",
           "|---|---|---|---|"]
    for label, n in pairs:
        ours, alst = steady[(label, n)], steady[("alst", n)]
        rate = ours["tokens_per_s"] / alst["tokens_per_s"]
        peak = ours.get("steady_peak_gib", ours["peak_gib"]) / alst.get("steady_peak_gib", alst["peak_gib"])
        out.append(f"| {label} | {n} | {rate:.2f}x {'(met)' if rate >= 1.3 else '(missed)'} | "
                   f"{peak:.2f}x {'(met)' if peak <= 0.7 else '(missed)'} |")
    out.append("")
    return out


def profile_tables():
    """Profiled steps (``bench_train.py --profile_step``, ``bench/step_profile.py``): seconds by kernel class."""
    rows = load("profile_*.json")
    if not rows:
        return []
    out = ["One step of each run under torch.profiler (its wall time includes the profiler's overhead). GPU busy: "
           "the union of compute kernels' intervals; idle: the rest of the step; classes sum kernel time (copies "
           "run on side streams, beside the compute); exposed copies: host copies with no compute kernel "
           "running.\n",
           "| run | seq_len | layers | step s | GPU busy | idle | attention | matmul | other kernels | copies to host "
           "| copies from host | exposed copies | file |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in rows:
        for r in d["steps"]:
            p = r.get("profile")
            if p is None:
                continue
            c = p["class_s"]
            out.append(f"| {d.get('label') or d['mode']} | {d['seq_len']} | {d['layers']} | {p['wall_s']:.2f} | "
                       f"{p['gpu_busy_s']:.2f} | {p['gpu_idle_s']:.2f} | {c.get('attention', 0):.2f} | "
                       f"{c.get('matmul', 0):.2f} | {c.get('other', 0) + c.get('copy_d2d', 0):.2f} | "
                       f"{c.get('copy_d2h', 0):.2f} | {c.get('copy_h2d', 0):.2f} | {p['exposed_copy_s']:.2f} | "
                       f"`{name}` |")
    out.append("")
    for name, d in rows:
        out.append(header(name, d))
    return out


def plan_check_tables():
    """The planner's predictions against measured steps (``bench/bench_plan.py``, re-predicted with ``--predict``):
    predicted / measured GPU peak, pinned host memory and step time per run."""
    rows = load("plan_*repredicted.json")
    if not rows:
        return []
    out = ["| run | GPU peak pred / meas | pinned host pred / meas | step s pred / meas | file |",
           "|---|---|---|---|---|"]
    for name, d in rows:
        for r in d["runs"]:
            if "predicted" not in r:
                continue
            p, m = r["predicted"], r["measured"]
            host = p.get("host_pinned_gib")
            if host is not None and r.get("host_pinned_gib_ratio") and m.get("host_pinned_gib"):
                host = r["host_pinned_gib_ratio"] * m["host_pinned_gib"]  # as bench_plan compared it (older records)
            out.append(f"| {r['name']} | {f(p.get('gpu_peak_gib'), '.1f')} / {f(m.get('gpu_peak_gib'), '.1f')} | "
                       f"{f(host, '.1f')} / {f(m.get('host_pinned_gib'), '.1f')} | "
                       f"{f(p.get('step_seconds'), '.2f')} / {f(m.get('step_seconds'), '.2f')} | `{name}` |")
    out.append("")
    out.append("Predicted by the planner at the commit each file names (`predicted_at_commit`); pinned host as "
               "`bench_plan.py` compares it (records from before the pool locked its own pages: the pool's buffers "
               "rounded to powers of two by torch's allocator). The lean runs' "
               "records predate the measurement of HostStateAdamW's moments (`host_optimizer_moments_gib`): their "
               "measured pinned host leaves out the moments' 24 GiB the prediction includes.\n")
    return out


def plan_max_tables():
    """``ds-longctx plan --seq-len max`` checked by training (``bench/bench_plan_max.py``): per case, the
    longest length, whether it trained, predicted / measured memory and time, and whether 1.1x was refused."""
    rows = load("plan_max_*.json")
    if not rows:
        return []
    out = ["| case | GPU / host GiB | longest length | trained | GPU peak pred / meas | pinned host pred / meas | "
           "step s pred / meas | 1.1x length | refused before any step |", "|---|---|---|---|---|---|---|---|---|"]
    for _, d in rows:
        for c in d["cases"]:
            plan, train, longer = c.get("plan", {}), c.get("train", {}), c.get("longer", {})
            machine = (f"{c['gpu_memory_gib']:.0f} / {c['host_memory_gib']:.0f} (capped)" if c["gpu_memory_gib"]
                       else f"{plan.get('machine', {}).get('gpu_memory_gib', '?')} / "
                            f"{plan.get('machine', {}).get('host_memory_gib', '?')} (this H200)")
            m = train.get("measured") or {}
            trained = ("yes" if train.get("status") == "ok" else
                       f"not run: {train.get('reason')}" if train.get("status") == "not_run" else train.get("status"))
            out.append(f"| {c['case']} | {machine} | {plan.get('seq_len')} | {trained} | "
                       f"{f(plan.get('gpu_peak_gib'), '.1f')} / {f(m.get('gpu_peak_gib'), '.1f')} | "
                       f"{f(plan.get('host_pinned_gib'), '.1f')} / {f(m.get('host_pinned_gib'), '.1f')} | "
                       f"{f(plan.get('step_seconds'), '.0f')} / {f(m.get('step_seconds'), '.0f')} | "
                       f"{longer.get('seq_len')} | {'yes' if longer.get('refused') else 'NO'} |")
    out.append("")
    for name, d in rows:
        out.append(header(name, d))
    return out


def main():
    print("# Benchmark results\n")
    print("Generated by `python bench/report.py > docs/results.md` from the JSON under `bench/results/`; "
          "each section names its file, the machine, versions, the exact command and the commit measured.\n")
    print("## Distributed attention\n")
    print("\n".join(attention_tables()))
    print("## FPDT chunking and host offload\n")
    print("\n".join(fpdt_tables()))
    print("## Packed documents\n")
    print("\n".join(documents_tables()))
    print("## Training (ZeRO-3, bf16)\n")
    print("\n".join(train_tables()))
    lines = plan_check_tables()
    if lines:
        print("## The planner's predictions against measured steps\n")
        print("\n".join(lines))
    lines = plan_max_tables()
    if lines:
        print("## The planner's longest length, trained\n")
        print("\n".join(lines))
    lines = long_sequence_tables()
    if lines:
        print("## Long sequences: plain ZeRO-3, DeepSpeed's ALST, ds_longctx\n")
        print("\n".join(lines))
    lines = profile_tables()
    if lines:
        print("## Where a step's GPU time goes (torch.profiler)\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
