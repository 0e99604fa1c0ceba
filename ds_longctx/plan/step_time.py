"""Seconds of one training step per rank: FLOPs at the GPU kind's measured rates, plus the communication
and PCIe transfers that are not hidden."""
from __future__ import annotations

from typing import Dict

from .activations import BF16, Widths, checkpointed_layers, outputs_kept, reruns
from .host_memory import estimate_host, fpdt_chunk_sets
from .host_optimizer import moments_step_seconds
from .rates import Rates, resolve_kernel
from .settings import Run, Settings


#: FPDT's chunk pipeline against one attention call, at chunks of 64K tokens and more: the full-depth 3B step at
#: 131K tokens on one H200 took 26.15 s with 64K chunks offloaded and 25.6 s unchunked, the rest alike
#: (``bench/results/alstcmp_ds_longctx_lean*_fusedall_llama3.2-3b_131072.json``): 0.55 s over 19 s of attention
FPDT_PIPELINE_EFFICIENCY = 0.97


def chunk_efficiency(chunk_size: int) -> float:
    """FPDT's attention rate against the unchunked kernel's: :data:`FPDT_PIPELINE_EFFICIENCY` from 64K-token
    chunks, lower below (more, shorter kernel launches and merges; bench/results/fpdt_*), so that where both fit
    the search prefers one attention call."""
    return FPDT_PIPELINE_EFFICIENCY * min(1.0, (chunk_size / 65536) ** 0.1)


#: Elementwise work (norms, RoPE, activations, residuals, casts, copies) and the GPU's idle gaps between kernels,
#: in passes over a layer's [tokens, hidden] bf16 activation at the device copy rate; a layer that is not
#: recomputed runs its forward's share once. Fitted to 15 measured steps on one H200 (1-28 layers, 65K-1M
#: tokens, hidden 3072 and 4096: ``bench/results/plan_h200x1_repredicted.json`` and
#: ``plan_alstcmp_h200x1_repredicted.json``), which the matmul and attention terms alone under-predicted by up to
#: 13%; a profile of a 4-layer step (``profile_ds_*``) puts a quarter of it in such kernels and idle time.
PASSES_CHECKPOINTED = 400
PASSES_UNCHECKED = 300
#: a layer's forward alone, rerun to rebuild the next layer's input: about a third of an unchecked layer's passes
PASSES_RERUN = 100


def estimate_time(run: Run, settings: Settings, rates: Rates, gpu_name: str) -> Dict[str, float]:
    """Seconds of one step per rank: matmuls and attention at the measured rates, the transfers not hidden."""
    m = run.model
    w = Widths(m, settings)
    tokens = run.micro_batch * run.seq_len // settings.sp
    checkpointed = checkpointed_layers(run, settings)
    # checkpointed layers without a kept attention output run their attention again in backward
    recompute_attention = checkpointed - outputs_kept(0, checkpointed, run, settings)
    flops = m.flops_per_step(run.seq_len, recomputed_layers=checkpointed,
                             attention_recomputed_layers=recompute_attention)
    rebuilt = reruns(run, settings)  # layer forwards once more, rebuilding inputs (checkpoint_every)
    rerun_matmul = 2 * rebuilt.layers * (m.layer_params - 2 * m.hidden) * run.seq_len
    matmul = (flops["matmul"] + rerun_matmul) * run.micro_batch / settings.sp
    if settings.mlp_tile_tokens is not None:
        matmul += 2 * 3 * w.h * w.i * tokens * m.layers  # each tile's forward once more in backward
    if settings.loss_tile_tokens is not None:
        matmul += 2 * w.v * w.h * tokens
    kernel = resolve_kernel(settings.kernel, gpu_name)
    attention_rate = rates.attention_flops.get(kernel, rates.attention_flops["sdpa_cudnn"])
    if settings.chunk_size is not None:
        attention_rate *= chunk_efficiency(settings.chunk_size)
    # a rerun takes the layer's kept attention output where it keeps one: only its projections and MLP run
    rerun_attention = rebuilt.with_attention * 2.0 * run.seq_len * run.seq_len * m.q_width
    attention = (flops["attention"] + rerun_attention) * run.micro_batch / settings.sp
    parts = {"matmul": matmul / rates.matmul_flops, "attention": attention / attention_rate}
    passes = (PASSES_CHECKPOINTED * checkpointed + PASSES_UNCHECKED * (m.layers - checkpointed)
              + PASSES_RERUN * rebuilt.layers)
    parts["elementwise"] = tokens * passes * BF16 * w.h / rates.device_copy_bytes
    if settings.ulysses > 1:  # q, k, v, out there and back: forward, backward, and the recompute's q, k, v (and out)
        a2a = (2 * w.q + 2 * w.kv) * tokens * BF16 * (settings.ulysses - 1) / settings.ulysses
        passes = checkpointed * 2.5 + recompute_attention * 0.5 + (m.layers - checkpointed) * 2
        hidden = 0.5 if settings.chunk_size is not None else 0.0  # FPDT overlaps per-chunk all-to-alls
        parts["all_to_all"] = (1 - hidden) * passes * a2a / rates.nvlink_all_to_all_bytes
    if run.world > 1:  # ZeRO-3 gathers (forward, recompute, backward) and gradient reduce-scatter, mostly hidden
        zero_bytes = 4 * BF16 * m.params * (run.world - 1) / run.world
        parts["zero3_comm"] = 0.3 * zero_bytes / rates.nvlink_all_to_all_bytes
    pcie = 0.0
    host = estimate_host(run, settings)
    layer_seconds = (parts["matmul"] + parts["attention"]) / max(1, m.layers)
    per_layer_bytes = 0.0
    if settings.checkpoint_offload_layers:
        per_layer_bytes += 2 * tokens * BF16 * w.h
    if settings.fpdt_offload:
        per_layer_bytes += 3 * host.get("fpdt_chunks", 0) / max(1, fpdt_chunk_sets(run, settings))
    if per_layer_bytes:
        pcie = m.layers * max(0.0, per_layer_bytes / rates.pcie_bytes - 0.9 * layer_seconds)
    taking_outputs = rebuilt.layers - rebuilt.with_attention
    if taking_outputs and (settings.checkpoint_offload_layers or settings.fpdt_offload):
        pcie += taking_outputs * tokens * BF16 * w.q / rates.pcie_bytes  # a rerun copies a kept output back, unhidden
    parts["offload_not_hidden"] = pcie
    if settings.zero.optimizer_offload:
        shard = m.params / run.world
        parts["optimizer_step"] = shard / rates.host_adam_params + 2 * BF16 * shard / rates.pcie_bytes
    elif settings.host_optimizer_states:
        parts["optimizer_step"] = moments_step_seconds(m, run.world, rates)
    else:
        parts["optimizer_step"] = 16 * 3 * (m.params / run.world) / rates.device_copy_bytes
    return parts


__all__ = ["chunk_efficiency", "estimate_time"]
