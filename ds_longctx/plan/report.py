"""What ``ds-longctx plan`` prints: one JSON object (``--json``) or a table."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from .machine import GIB, Machine
from .verdict import Verdict
from .settings import Run


def plan_record(run: Run, machine: Machine, verdict: Verdict, base_ds: Mapping[str, Any],
                reason: Optional[str] = None) -> Dict[str, Any]:
    """The JSON contract: seq_len, fits, gpu_peak_gib, host_pinned_gib, step_seconds, components,
    ds_config (complete, long_context included), and more."""
    e = verdict.estimate
    layers = run.model.layers
    return {
        "model": run.model.name, "seq_len": run.seq_len, "world_size": run.world, "micro_batch": run.micro_batch,
        "checkpointing": run.checkpointing, "fits": verdict.fits,
        "gpu_peak_gib": round(e.gpu_peak / GIB, 3), "gpu_limit_gib": round(verdict.gpu_limit / GIB, 3),
        "host_pinned_gib": round(e.host_pinned / GIB, 3),
        "host_per_node_gib": round(verdict.node_host / GIB, 3), "host_limit_gib": round(verdict.host_limit / GIB, 3),
        "step_seconds": round(e.step_seconds, 3),
        "tokens_per_second": round(run.seq_len * run.micro_batch * run.world / verdict.settings.sp / e.step_seconds, 1),
        "peak_moment": e.peak_moment,
        "components": {k: round(v / GIB, 3) for k, v in sorted(e.gpu_components.items(), key=lambda kv: -kv[1])},
        "host_components": {k: round(v / GIB, 3) for k, v in e.host_components.items()},
        "time_components": {k: round(v, 3) for k, v in e.time_components.items() if v},
        "machine": {"gpus": machine.gpus, "gpu_name": machine.gpu_name,
                    "gpu_memory_gib": round(machine.gpu_memory / GIB, 2),
                    "host_memory_gib": round(machine.host_memory / GIB, 2)},
        "ds_config": verdict.settings.ds_config(base_ds, layers, run.seq_len),
        **({"reason": reason} if reason else {}),
    }


def table(record: Mapping[str, Any]) -> str:
    """A readable summary of :func:`plan_record`."""
    lc = record["ds_config"]["long_context"]
    lines = [
        f"{record['model']}: {record['seq_len']:,} tokens x micro-batch {record['micro_batch']} on "
        f"{record['world_size']} x {record['machine']['gpu_name']} ({record['machine']['gpu_memory_gib']} GiB; host "
        f"{record['machine']['host_memory_gib']} GiB per node)",
        f"  fits: {'yes' if record['fits'] else 'NO'}   GPU peak {record['gpu_peak_gib']:.1f} / "
        f"{record['gpu_limit_gib']:.1f} GiB usable ({record['peak_moment'].replace('_', ' ')})   pinned host "
        f"{record['host_pinned_gib']:.1f} GiB per rank ({record['host_per_node_gib']:.1f} / "
        f"{record['host_limit_gib']:.1f} GiB per node)",
        f"  step {record['step_seconds']:.2f} s   {record['tokens_per_second']:,.0f} tokens/s",
        "  settings:",
        f"    ulysses x ring          {lc['ulysses_degree']} x {lc['ring_degree']}",
        f"    fpdt chunk / offload    {lc['fpdt']['chunk_size']} / {lc['fpdt']['offload']}",
        f"    keep_attention_output   {lc['keep_attention_output']}",
        f"    checkpoint_layers       {'all' if lc.get('checkpoint_layers') is None else lc['checkpoint_layers']}",
        f"    checkpoint_offload      {lc['checkpoint_offload']}",
        f"    checkpoint_every        {lc.get('checkpoint_every', 1)}",
        f"    mlp / loss tile tokens  {lc['mlp_tile_tokens']} / {lc['loss_tile_tokens']}",
        f"    optimizer offload       {'offload_optimizer' in record['ds_config'].get('zero_optimization', {})}",
    ]
    if lc.get("host_optimizer_states"):
        lines.append("    AdamW moments           in pinned host memory (host_optimizer_states)")
    lines += [
        "  GPU peak by component (GiB):",
    ]
    lines += [f"    {name:24s}{gib:8.2f}" for name, gib in record["components"].items()]
    if record["host_components"]:
        lines.append("  pinned host per rank (GiB):")
        lines += [f"    {name:24s}{gib:8.2f}" for name, gib in record["host_components"].items()]
    if record.get("reason"):
        lines.append(f"  {record['reason']}")
    return "\n".join(lines)


__all__ = ["plan_record", "table"]
