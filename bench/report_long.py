"""The report's long-sequence sections: plain ZeRO-3, ALST and ds_longctx by length (``run_alst_compare.py``),
each ds_longctx run against ALST, and profiled steps (``bench_train.py --profile_step``)."""
from __future__ import annotations

import os

from bench.report_common import f, header, load


def long_sequence_tables(rows=None, launches=None):
    """Plain ZeRO-3, ALST and ds_longctx at growing lengths (``bench/run_alst_compare.py``): per model, each run
    label's rate, GPU peak and host memory by length, then the longest length each label trained. ``launches``:
    how each record's launch ended, by file name (default: from the committed sweeps' summaries)."""
    if rows is None:
        # the sweeps' plan JSONs share the prefix; a run's record names its mode
        rows = [(n, d) for n, d in load("alstcmp*.json") if not n.endswith("_summary.json") and "mode" in d]
    if not rows:
        return []
    from bench.models import run_model_name

    launches = launch_records() if launches is None else launches
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
    for model, runs in sorted(by_model.items(), key=lambda item: item[1][0][1]["params"]):  # smallest first
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
            if d.get("partial") and launches.get(name, {}).get("status") == "killed":
                # SIGKILL with no Python error: on these hosts the kernel's out-of-memory killer (pinned memory
                # cannot be swapped), so it counts as the first length out of memory
                first_oom.setdefault(label, d["seq_len"])
                probe = ", probe" if d.get("probe_layers") else ""
                out.append(f"| {label} | {d['seq_len']} | killed in step {len(d['steps'])}{probe} (SIGKILL, no "
                           f"Python error: host memory full) |||||{losses} | `{name}` |")
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
        out.extend(pictures(model))
    for name, d in rows:
        out.append(header(name, d))
    return out


#: where ``bench/plot.py`` puts the pictures (``docs/alst_<model>_*.png``) and the report is read from
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def pictures(model: str) -> list:
    """The model's tokens/s and GPU-peak pictures (``bench/plot.py``), where they were drawn, as Markdown
    images relative to docs/."""
    out = []
    for kind, alt in (("tokens_per_s", "tokens/s"), ("gpu_peak", "GPU peak")):
        name = f"alst_{model}_{kind}.png"
        if os.path.exists(os.path.join(DOCS, name)):
            out.append(f"![{alt} against sequence length, {model}]({name})\n")
    return out


def launch_records() -> dict:
    """Each launch of ``run_alst_compare.py`` by its record's file name, from the sweeps' summaries: how it
    ended (``ok``, ``oom``, ``killed``, ...), which a record cut short by SIGKILL cannot say itself."""
    return {os.path.basename(run["json"]): run for _, summary in load("alstcmp*_summary.json")
            for run in summary.get("runs", []) if run.get("json")}


def sweep_prefix(name: str, d: dict) -> str:
    """The ``--prefix`` of the ``run_alst_compare.py`` sweep that wrote a record (its file is
    ``<prefix>_<variant>_<model>_<length>.json``)."""
    return name.split(f"_{d.get('label') or d['mode']}_")[0]


def against_alst(runs) -> list:
    """Each ds_longctx run against ALST's at the same length (both with a steady step): tokens/s and steady GPU
    peak as ratios, with the targets of the comparison (>= 1.3x the rate, <= 0.7x the peak). The ALST run is
    the one of the same sweep where there is one (measured in the same device call), else the first by name."""
    steady = []
    for name, d in sorted(runs, key=lambda r: r[0]):
        s = d.get("summary") or {}
        if "oom" not in d and not d.get("probe_layers") and s.get("tokens_per_s"):
            steady.append((name, d.get("label") or d["mode"], d["seq_len"], sweep_prefix(name, d), s))
    out = []
    for name, label, n, prefix, ours in sorted(steady, key=lambda r: (r[2], r[1], r[0])):
        if not label.startswith("ds_longctx"):
            continue
        alsts = [r for r in steady if r[1] == "alst" and r[2] == n]
        alsts.sort(key=lambda r: r[3] != prefix)  # the same sweep's first; stable otherwise: by name
        if not alsts:
            continue
        alst_name, alst = alsts[0][0], alsts[0][4]
        rate = ours["tokens_per_s"] / alst["tokens_per_s"]
        peak = ours.get("steady_peak_gib", ours["peak_gib"]) / alst.get("steady_peak_gib", alst["peak_gib"])
        out.append(f"| {label} | {n} | {rate:.2f}x {'(met)' if rate >= 1.3 else '(missed)'} | "
                   f"{peak:.2f}x {'(met)' if peak <= 0.7 else '(missed)'} | `{name}` | `{alst_name}` |")
    if not out:
        return []
    return ["| run | seq_len | tokens/s vs ALST (target >= 1.30) | GPU peak vs ALST (target <= 0.70) | file | "
            "ALST's file |", "|---|---|---|---|---|---|", *out, ""]


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
