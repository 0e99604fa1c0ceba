"""The report's planner sections: predictions against measured steps (``bench_plan.py``), the longest
length trained (``bench_plan_max.py``) and the longest length predicted (``plan_longest.py``)."""
from __future__ import annotations

from bench.report_common import f, header, load


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


def plan_longest_tables():
    """The planner's longest length per model with every checkpointed layer keeping its input and with inputs
    rebuilt in backward (``bench/plan_longest.py``, planner only)."""
    rows = load("plan_longest_*.json")
    if not rows:
        return []
    out = ["| model | layers | inputs | longest length | checkpoint_every | GPU peak GiB | pinned host GiB | "
           "step s | file |", "|---|---|---|---|---|---|---|---|---|"]
    for name, d in rows:
        for r in d["rows"]:
            kept = "every input kept" if r["fixed"].get("checkpoint_every") == 1 else "rebuilt where needed"
            every = (r.get("block") or {}).get("checkpoint_every", "-")
            out.append(f"| {r['model'].split(':')[0]} | {r['layers']} | {kept} | {r.get('seq_len')} | {every} | "
                       f"{f(r.get('gpu_peak_gib'), '.1f')} | {f(r.get('host_pinned_gib'), '.1f')} | "
                       f"{f(r.get('step_seconds'), '.0f')} | `{name}` |")
    out.append("")
    out.append("Predicted, not run (a step at these lengths takes longer than a device call may run); the machine's "
               "facts are the file's `machine`. Which predictions were checked on the GPU: README's ALST section.\n")
    for name, d in rows:
        out.append(header(name, d))
    return out
