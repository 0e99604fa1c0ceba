"""One training step of a transformers causal LM under ds_longctx and DeepSpeed ZeRO-3 (bf16), per rank.

The GPU peak is the largest of three moments of a step (four with ``checkpoint_layers`` below the depth),
each a sum of named components (bytes):

* forward: what the forward leaves for backward (checkpointed inputs, kept attention outputs, the unchecked
  layers' whole activations (:mod:`.activations`), the final hidden states, the loss's saved
  log-probabilities) plus the largest transient of a layer's forward or of the loss;
* loss backward: all of that plus the logits' gradients (one tile's with ``loss_tile_tokens``);
* the first layer backward (the last layer, recomputed under checkpointing): every checkpoint still held,
  plus the layer's working set: what its recompute saves (projections' inputs, the attention's q/k/v and
  output, the MLP's four ``intermediate``-wide activations, or one tile's with ``mlp_tile_tokens``) and the
  gradients in flight, plus the attention's working set (unchunked, or FPDT's chunk buffers); a last layer
  left unchecked has only its backward's working set;
* checkpointed backward (some layers unchecked): the last checkpointed layer's recompute and backward, once
  the unchecked layers after it have freed their activations.

Every moment also holds the static part: ZeRO-3's partitions of the bf16 parameters (and, with the
optimizer on the GPU, of the bf16 gradients, fp32 master weights and Adam's two moments), its gradient
bucket, and the gathered parameters of the layer at work and the one prefetched.
Coefficients are per token and count each tensor once, in the units of the model's widths; they follow
how the code allocates (transformers' Llama layer, :mod:`ds_longctx.memory` and :mod:`ds_longctx.attention`)
and are checked against the allocator on CPU (tests/test_plan.py) and on an H200 (bench/bench_plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple

from ..geometry import ChunkGeometry
from .activations import (BF16, FP32, Widths, checkpointed_layers, kept_bytes, layer_saved, norm_saved,
                          unchecked_layer_bytes)
from .machine import GIB
from .offload_optimizer import offload_optimizer_host, power_of_two_ceil
from .rates import Rates, resolve_kernel
from .settings import Run, Settings

#: Host memory of a training process besides pinned buffers: CUDA context, torch, DeepSpeed, the data.
PROCESS_HOST_BYTES = 6 * GIB


@dataclass
class Estimate:
    """Predicted bytes and seconds of one steady-state step (after the first optimizer step), per rank."""

    gpu_peak: int
    gpu_components: Dict[str, int]  # the peak moment, by component
    peak_moment: str
    moments: Dict[str, int]  # forward / loss_backward / layer_backward totals
    host_pinned: int
    host_components: Dict[str, int]
    host_other: int  # host memory besides the pinned buffers (the process, pageable optimizer states)
    step_seconds: float
    time_components: Dict[str, float] = field(default_factory=dict)

    def gib(self, nbytes: int) -> float:
        return nbytes / GIB


def _chunk_efficiency(chunk_size: int) -> float:
    """FPDT's attention rate against the unchunked kernel's: 1 from 64K-token chunks, lower below
    (more, shorter kernel launches and merges; measured 1.03x at 64K, bench/results/fpdt_*)."""
    return min(1.0, (chunk_size / 65536) ** 0.1)


def _static(run: Run, settings: Settings) -> Dict[str, int]:
    m, world = run.model, run.world
    zero = settings.zero
    persistent = (2 * m.layers + 1) * m.hidden  # norms: under the persistence threshold, on every rank
    parts = {"parameters": BF16 * (m.params // world + persistent)}
    if zero.optimizer_offload:
        parts["gradients"] = 0
        parts["optimizer_states"] = 0
    else:
        parts["gradients"] = BF16 * m.params // world
        parts["optimizer_states"] = 3 * FP32 * m.params // world  # fp32 master, Adam's m and v
    parts["gradient_buckets"] = BF16 * min(zero.reduce_bucket, m.params)
    return parts


def _gathers(run: Run, settings: Settings, phase: str) -> int:
    """ZeRO-3's gathered bf16 parameters at work: the module computing and what is prefetched after it."""
    m = run.model
    layer = m.layer_params
    prefetch = min(settings.zero.prefetch_bucket, layer)
    if phase == "loss":
        return BF16 * (m.vocab * m.hidden + prefetch)
    return BF16 * (layer + prefetch)


def _layer_offloaded(layer: int, settings: Settings) -> bool:
    return layer < settings.checkpoint_offload_layers


def _stored(run: Run, settings: Settings, w: Widths, tokens: int) -> Dict[str, int]:
    """What the forward leaves on the GPU for backward (all layers), by component: the checkpointed layers'
    inputs and kept outputs (those not in host memory), the other layers' whole saved activations."""
    m = run.model
    parts: Dict[str, int] = {}
    checkpointed = checkpointed_layers(run, settings)
    if run.checkpointing:
        on_gpu = [layer for layer in range(checkpointed) if not _layer_offloaded(layer, settings)]
        parts["checkpoints"] = len(on_gpu) * tokens * BF16 * w.h
        kept_on_gpu = settings.keep_attention_output and not settings.fpdt_offload
        parts["kept_attention"] = len(on_gpu) * kept_bytes(tokens, w) if kept_on_gpu else 0
    if checkpointed < m.layers:
        parts["activations"] = (m.layers - checkpointed) * unchecked_layer_bytes(settings, w, tokens)
    norm = BF16 * w.h if settings.lean_rms_norm else FP32 * w.h
    # the last layer's output (saved by the final norm) and the normed states the LM head saves
    parts["final_hidden"] = tokens * (norm + BF16 * w.h + FP32)
    parts["rotary"] = tokens * 2 * BF16 * w.d
    parts["loss_logits"] = 0 if settings.loss_tile_tokens else tokens * FP32 * w.v  # saved log-probabilities
    return parts


def _fpdt_buffers(run: Run, settings: Settings, w: Widths) -> int:
    """FPDT's device buffers at the larger of its forward and backward peaks, as the chunk geometry counts
    them (:meth:`ds_longctx.geometry.ChunkGeometry.working_set`): the chunks in flight, and without offload
    every chunk's saved q/out/K/V/lse and dK/dV accumulators."""
    geometry = ChunkGeometry(seq_len=run.seq_len, ulysses=settings.ulysses, ring=settings.ring,
                             chunk_size=settings.chunk_size)
    return max(ws.nbytes(batch=run.micro_batch, chunk_tokens=geometry.chunk_tokens, heads=w.heads_per_rank,
                         kv_heads=w.kv_heads_per_rank, head_dim=w.d, chunks=geometry.chunks, ring=settings.ring,
                         itemsize=BF16, acc_itemsize=FP32)
               for ws in geometry.working_set(settings.fpdt_offload))


def _ring_buffers(settings: Settings, w: Widths, tokens: int) -> int:
    """Unchunked ring: a peer's K/V block in flight beside the one computing, and in backward the fp32
    dK/dV that travel with it (attention/ring.py)."""
    if settings.ring == 1:
        return 0
    group_tokens = tokens * settings.ulysses
    kv = 2 * group_tokens * w.kv_heads_per_rank * w.d
    return 2 * kv * BF16 + 2 * kv * FP32


def _layer_backward(run: Run, settings: Settings, w: Widths, tokens: int, recompute: bool) -> Dict[str, int]:
    """The working set of one layer's backward (its recompute included when ``recompute``): saved graph +
    gradients in flight."""
    saved = layer_saved(settings, w, tokens, recompute=recompute)
    mlp_tokens = min(tokens, settings.mlp_tile_tokens or tokens)
    tile = 0
    if settings.mlp_tile_tokens is not None:
        tile = mlp_tokens * 4 * BF16 * w.i  # one tile's recomputed activations
    # MLP phase, at the product's backward: d(down's input), d(act), d(up) live while the down projection's
    # saved input is already freed (net two intermediate-wide tensors over the saved ones), plus the
    # output's and the input's gradients
    mlp_phase = tile + mlp_tokens * 2 * BF16 * w.i + tokens * 2 * BF16 * w.h
    mlp_saved = tokens * BF16 * w.h + (0 if settings.mlp_tile_tokens else tokens * 4 * BF16 * w.i)
    if settings.chunk_size is None:
        # attention phase: d(out), dq/dk/dv, the kernel's fp32 dq accumulator, the residual gradient
        attention_phase = tokens * (BF16 * (2 * w.q + 2 * w.kv) + FP32 * w.q + 2 * BF16 * w.h)
        attention_phase += _ring_buffers(settings, w, tokens)
        released = mlp_saved
    else:
        # FPDT's backward (its buffers: tests/test_geometry.py): d(out), the dq/dk/dv it returns, the residual
        # stream's gradient and the chunk buffers; the MLP's saved activations (its input among them) and
        # what the post-attention norm saved (the residual sum, 1/rms) were freed by their backwards
        attention_phase = tokens * (BF16 * (2 * w.q + 2 * w.kv) + BF16 * w.h) + _fpdt_buffers(run, settings, w)
        # the kernel's fp32 dq accumulator, as the unchunked one's, for one block of a chunk's queries
        attention_phase += run.micro_batch * settings.chunk_size * w.heads_per_rank * w.d * FP32
        released = mlp_saved + norm_saved(settings, w, tokens)
    return {
        "layer_saved": saved,
        "mlp_working_set": mlp_phase,
        "attention_working_set": max(0, attention_phase - mlp_phase - released),
    }


def _loss_transient(run: Run, settings: Settings, w: Widths, tokens: int, phase: str) -> int:
    """The logits' working set: bf16 logits, their fp32 copy and the log-probabilities in forward; in backward
    the fp32 gradients and their bf16 copy (one tile at a time with loss_tile_tokens)."""
    tile = min(tokens, settings.loss_tile_tokens or tokens)
    if phase == "forward":
        return tile * w.v * (BF16 + 2 * FP32) - (0 if settings.loss_tile_tokens else tokens * FP32 * w.v)
    recompute = tile * w.v * FP32 if settings.loss_tile_tokens else 0  # the tile's saved log-probabilities
    return recompute + tile * w.v * (2 * FP32 + BF16) + tokens * BF16 * w.h


def estimate_memory(run: Run, settings: Settings) -> Dict[str, Dict[str, int]]:
    """The components of each moment of the step (bytes per rank)."""
    w = Widths(run.model, settings)
    tokens = run.micro_batch * run.seq_len // settings.sp
    static = _static(run, settings)
    stored = _stored(run, settings, w, tokens)
    checkpointed = checkpointed_layers(run, settings)

    forward = dict(static, **stored)
    forward["zero3_gathers"] = _gathers(run, settings, "layer")
    layer_forward = tokens * (2 * BF16 * w.h + BF16 * (w.q + 2 * w.kv)) + min(
        tokens, settings.mlp_tile_tokens or tokens) * 3 * BF16 * w.i
    forward["forward_working_set"] = max(layer_forward, _loss_transient(run, settings, w, tokens, "forward"))

    loss = dict(static, **stored)
    loss["zero3_gathers"] = _gathers(run, settings, "loss")
    loss["loss_working_set"] = _loss_transient(run, settings, w, tokens, "backward")

    layer = _backward_moment(run, settings, static, stored)
    if checkpointed == run.model.layers:
        layer.update(_recompute_working_set(run, settings, w, tokens, run.model.layers - 1))
    else:  # the last layer keeps its activations: no recompute
        layer["layer_working_set"] = _layer_backward(run, settings, w, tokens, recompute=False)["mlp_working_set"]
    moments = {"forward": forward, "loss_backward": loss, "layer_backward": layer}
    if 0 < checkpointed < run.model.layers:
        # the last checkpointed layer recomputes once the unchecked layers after it have freed their activations
        recompute = _backward_moment(run, settings, static, dict(stored, activations=0))
        recompute.update(_recompute_working_set(run, settings, w, tokens, checkpointed - 1))
        moments["checkpointed_backward"] = recompute
    return moments


def _backward_moment(run: Run, settings: Settings, static: Dict[str, int], stored: Dict[str, int]) -> Dict[str, int]:
    """A layer backward's moment without the layer's working set: the loss's tensors are gone by then."""
    moment = dict(static, **stored)
    moment["final_hidden"] = 0
    moment["loss_logits"] = 0
    moment["zero3_gathers"] = _gathers(run, settings, "layer")
    return moment


def _recompute_working_set(run: Run, settings: Settings, w: Widths, tokens: int, layer: int) -> Dict[str, int]:
    """The backward of checkpointed ``layer`` (the last one backward reaches first): what comes back from the
    host for its recompute, and the recompute's working set."""
    parts: Dict[str, int] = {}
    if _layer_offloaded(layer, settings) or (settings.keep_attention_output and settings.fpdt_offload):
        # brought back for the recompute: its input (and the one prefetched next), its kept output
        back = 0
        if _layer_offloaded(layer, settings):  # and, with a layer before it, that layer's input prefetched
            back += min(2, layer + 1) * tokens * BF16 * w.h
        if settings.keep_attention_output:
            back += kept_bytes(tokens, w)
        parts["offload_prefetch"] = back
    parts.update(_layer_backward(run, settings, w, tokens, recompute=True))
    return parts


def _fpdt_chunk_sets(run: Run, settings: Settings) -> int:
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
        sets = _fpdt_chunk_sets(run, settings)
        for width in (BF16 * w.q, BF16 * w.kv, BF16 * w.kv, BF16 * w.q, FP32 * w.heads, FP32 * w.kv, FP32 * w.kv):
            buffers.append(HostBuffer("fpdt_chunks", tokens * width, sets))
    if run.checkpointing:
        offloaded = settings.checkpoint_offload_layers
        buffers.append(HostBuffer("checkpoint_offload", tokens * BF16 * w.h, offloaded))
        kept_layers = 0
        if settings.keep_attention_output:
            kept_layers = checkpointed_layers(run, settings) if settings.fpdt_offload else offloaded
        buffers += [HostBuffer("kept_attention", tokens * BF16 * w.q, kept_layers),
                    HostBuffer("kept_attention", tokens * FP32 * w.heads, kept_layers)]
    return buffers


def estimate_host(run: Run, settings: Settings, pool_in_torch_allocator: bool = False) -> Dict[str, int]:
    """Pinned host memory per rank: the offload pool (FPDT's chunks, checkpoint offload, kept outputs), which
    page-locks exactly its buffers' bytes, and the offloaded optimizer's pinned gradients, which torch's pinned
    allocator rounds to powers of two (:mod:`.offload_optimizer`).

    ``pool_in_torch_allocator``: round the pool's buffers to powers of two too, as torch's allocator did before
    the pool locked its own pages (to compare with measurements of that time)."""
    parts: Dict[str, int] = {}
    for buf in pool_buffers(run, settings):
        each = power_of_two_ceil(buf.nbytes) if pool_in_torch_allocator else buf.nbytes
        parts[buf.component] = parts.get(buf.component, 0) + buf.count * each
    if settings.zero.optimizer_offload:
        parts["optimizer_offload"] = offload_optimizer_host(run.model, run.world, settings.zero).pinned
    return parts


def host_pageable(run: Run, settings: Settings) -> int:
    """Host memory per rank besides pinned buffers: the process itself and the offloaded optimizer's pageable
    fp32 master weights and Adam moments."""
    extra = offload_optimizer_host(run.model, run.world, settings.zero).pageable if settings.zero.optimizer_offload \
        else 0
    return PROCESS_HOST_BYTES + extra


def estimate_time(run: Run, settings: Settings, rates: Rates, gpu_name: str) -> Dict[str, float]:
    """Seconds of one step per rank: matmuls and attention at the measured rates, the transfers not hidden."""
    m = run.model
    w = Widths(m, settings)
    tokens = run.micro_batch * run.seq_len // settings.sp
    checkpointed = checkpointed_layers(run, settings)
    recompute_attention = checkpointed > 0 and not settings.keep_attention_output
    flops = m.flops_per_step(run.seq_len, recompute_layers=checkpointed > 0, recompute_attention=recompute_attention,
                             recomputed_layers=checkpointed)
    matmul = flops["matmul"] * run.micro_batch / settings.sp
    if settings.mlp_tile_tokens is not None:
        matmul += 2 * 3 * w.h * w.i * tokens * m.layers  # each tile's forward once more in backward
    if settings.loss_tile_tokens is not None:
        matmul += 2 * w.v * w.h * tokens
    kernel = resolve_kernel(settings.kernel, gpu_name)
    attention_rate = rates.attention_flops.get(kernel, rates.attention_flops["sdpa_cudnn"])
    if settings.chunk_size is not None:
        attention_rate *= _chunk_efficiency(settings.chunk_size)
    attention = flops["attention"] * run.micro_batch / settings.sp
    parts = {"matmul": matmul / rates.matmul_flops, "attention": attention / attention_rate}
    # elementwise work (norms, RoPE, activations, residuals, casts): ~40 passes over [tokens, hidden] a
    # checkpointed layer (forward 10, recompute 10, backward 20), ~30 a layer that is not recomputed
    passes = 40 * checkpointed + 30 * (m.layers - checkpointed)
    parts["elementwise"] = tokens * passes * BF16 * w.h / rates.device_copy_bytes
    if settings.ulysses > 1:  # q, k, v, out there and back: forward, backward, and the recompute's q, k, v (and out)
        a2a = (2 * w.q + 2 * w.kv) * tokens * BF16 * (settings.ulysses - 1) / settings.ulysses
        passes = checkpointed * (3 if recompute_attention else 2.5) + (m.layers - checkpointed) * 2
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
        per_layer_bytes += 3 * host.get("fpdt_chunks", 0) / max(1, _fpdt_chunk_sets(run, settings))
    if per_layer_bytes:
        pcie = m.layers * max(0.0, per_layer_bytes / rates.pcie_bytes - 0.9 * layer_seconds)
    parts["offload_not_hidden"] = pcie
    if settings.zero.optimizer_offload:
        shard = m.params / run.world
        parts["optimizer_step"] = shard / rates.host_adam_params + 2 * BF16 * shard / rates.pcie_bytes
    else:
        parts["optimizer_step"] = 16 * 3 * (m.params / run.world) / rates.device_copy_bytes
    return parts


def estimate(run: Run, settings: Settings, rates: Rates, gpu_name: str = "NVIDIA H200") -> Estimate:
    """Memory and time of one steady-state step of ``run`` with ``settings`` (per rank)."""
    moments = estimate_memory(run, settings)
    totals = {name: sum(parts.values()) for name, parts in moments.items()}
    peak_moment = max(totals, key=totals.get)
    host = estimate_host(run, settings)
    times = estimate_time(run, settings, rates, gpu_name)
    return Estimate(gpu_peak=totals[peak_moment], gpu_components={k: v for k, v in moments[peak_moment].items() if v},
                    peak_moment=peak_moment, moments=totals, host_pinned=sum(host.values()),
                    host_components={k: v for k, v in host.items() if v}, host_other=host_pageable(run, settings),
                    step_seconds=sum(times.values()), time_components=times)


__all__ = ["Estimate", "HostBuffer", "estimate", "estimate_host", "estimate_memory", "estimate_time", "host_pageable",
           "pool_buffers"]
