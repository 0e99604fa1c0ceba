"""Host memory of one training step per rank: the offload pool's page-locked buffers (FPDT's chunks,
offloaded checkpoints, kept attention outputs), the offloaded optimizer's pinned gradients or the AdamW moments
of ``host_optimizer_states``, and what stays pageable."""
from __future__ import annotations

from typing import Dict, List, NamedTuple

from .activations import BF16, FP32, Widths, checkpointed_layers, inputs_kept, outputs_kept
from .host_optimizer import host_moments_bytes
from .machine import GIB
from .offload_optimizer import offload_optimizer_host, power_of_two_ceil
from .settings import Run, Settings

#: Host memory of a training process besides pinned buffers: CUDA context, torch, DeepSpeed, the data.
PROCESS_HOST_BYTES = 6 * GIB


def fpdt_chunk_sets(run: Run, settings: Settings) -> int:
    """Layers' worth of FPDT chunks in host memory at once: a layer without checkpointing keeps its chunks from
    forward to backward; the checkpointed ones build theirs in the recompute, one layer at a time, after the
    unchecked layers (the last ones) have freed theirs."""
    checkpointed = checkpointed_layers(run, settings)
    return max(run.model.layers - checkpointed, 1 if checkpointed else 0)


class HostBuffer(NamedTuple):
    """``count`` pinned host buffers of ``nbytes`` each, part of the host component ``component``."""

    component: str
    nbytes: int
    count: int


def pool_buffers(run: Run, settings: Settings) -> List[HostBuffer]:
    """The offload pool's buffers per rank: FPDT's chunks, offloaded checkpoints, kept attention outputs."""
    m = run.model
    w = Widths(m, settings)
    tokens = run.micro_batch * run.seq_len // settings.sp
    buffers: List[HostBuffer] = []
    if settings.fpdt_offload:
        # one layer's chunks (built by its recompute under checkpointing, every layer's without), one buffer
        # per kind: q, k, v, out, lse and the fp32 dK/dV accumulators
        sets = fpdt_chunk_sets(run, settings)
        for width in (BF16 * w.q, BF16 * w.kv, BF16 * w.kv, BF16 * w.q, FP32 * w.heads, FP32 * w.kv, FP32 * w.kv):
            buffers.append(HostBuffer("fpdt_chunks", tokens * width, sets))
    if run.checkpointing:
        offloaded = settings.checkpoint_offload_layers
        inputs = inputs_kept(0, offloaded, settings)  # the others rebuild theirs
        buffers.append(HostBuffer("checkpoint_offload", tokens * BF16 * w.h, inputs))
        # with FPDT's offload every kept output is in host memory, else those of the offloaded layers
        kept_layers = outputs_kept(0, checkpointed_layers(run, settings) if settings.fpdt_offload else offloaded,
                                   run, settings)
        buffers += [HostBuffer("kept_attention", tokens * BF16 * w.q, kept_layers),
                    HostBuffer("kept_attention", tokens * FP32 * w.heads, kept_layers)]
    return buffers


def estimate_host(run: Run, settings: Settings, pool_in_torch_allocator: bool = False) -> Dict[str, int]:
    """Pinned host memory per rank: the offload pool (FPDT's chunks, checkpoint offload, kept outputs), which
    page-locks exactly its buffers' bytes, and the offloaded optimizer's pinned gradients, which torch's pinned
    allocator rounds to powers of two (:mod:`.offload_optimizer`), or the AdamW moments of
    ``host_optimizer_states``, page-locked exactly (:mod:`.host_optimizer`).

    ``pool_in_torch_allocator``: round the pool's buffers to powers of two too, as torch's allocator did before
    the pool locked its own pages (to compare with measurements of that time)."""
    parts: Dict[str, int] = {}
    for buf in pool_buffers(run, settings):
        each = power_of_two_ceil(buf.nbytes) if pool_in_torch_allocator else buf.nbytes
        parts[buf.component] = parts.get(buf.component, 0) + buf.count * each
    if settings.zero.optimizer_offload:
        parts["optimizer_offload"] = offload_optimizer_host(run.model, run.world, settings.zero).pinned
    elif settings.host_optimizer_states:
        parts["optimizer_moments"] = host_moments_bytes(run.model, run.world, settings.zero)
    return parts


def host_pageable(run: Run, settings: Settings) -> int:
    """Host memory per rank besides pinned buffers: the process itself and the offloaded optimizer's pageable
    fp32 master weights and Adam moments."""
    extra = offload_optimizer_host(run.model, run.world, settings.zero).pageable if settings.zero.optimizer_offload \
        else 0
    return PROCESS_HOST_BYTES + extra


__all__ = ["HostBuffer", "PROCESS_HOST_BYTES", "estimate_host", "fpdt_chunk_sets", "host_pageable", "pool_buffers"]
