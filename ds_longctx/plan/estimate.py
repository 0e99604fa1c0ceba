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
optimizer on the GPU, of the bf16 gradients, fp32 master weights and Adam's two moments, those in host memory
with ``host_optimizer_states``), its gradient
bucket, and the gathered parameters of the layer at work and the one prefetched.
Coefficients are per token and count each tensor once, in the units of the model's widths; they follow
how the code allocates (transformers' Llama layer, :mod:`ds_longctx.memory` and :mod:`ds_longctx.attention`)
and are checked against the allocator on CPU (tests/test_plan.py) and on an H200 (bench/bench_plan.py).
Host memory is :mod:`.host_memory`'s, step time :mod:`.step_time`'s; :func:`estimate` puts the three together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from ..geometry import ChunkGeometry
from .activations import (BF16, FP32, Widths, checkpointed_layers, inputs_kept, keeps_input, keeps_output, kept_bytes,
                          layer_saved, mlp_saved_widths, norm_saved, outputs_kept, unchecked_layer_bytes)
from .host_memory import HostBuffer, estimate_host, host_pageable, pool_buffers
from .host_optimizer import staging_bytes
from .machine import GIB
from .rates import Rates
from .settings import Run, Settings
from .step_time import estimate_time

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
        # fp32 master, Adam's m and v (the moments in host memory with host_optimizer_states, passing through
        # staging slots on the GPU)
        parts["optimizer_states"] = (1 if settings.host_optimizer_states else 3) * FP32 * m.params // world
        if settings.host_optimizer_states:
            parts["optimizer_staging"] = staging_bytes(m, world, zero)
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
        first_on_gpu = min(settings.checkpoint_offload_layers, checkpointed)  # the first ones offload
        parts["checkpoints"] = inputs_kept(first_on_gpu, checkpointed, settings) * tokens * BF16 * w.h
        kept_on_gpu = 0 if settings.fpdt_offload else outputs_kept(first_on_gpu, checkpointed, run, settings)
        parts["kept_attention"] = kept_on_gpu * kept_bytes(tokens, w)
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


def _layer_backward(run: Run, settings: Settings, w: Widths, tokens: int, recompute: bool,
                    kept_output: bool = False) -> Dict[str, int]:
    """The working set of one layer's backward (its recompute included when ``recompute``, taking its kept
    attention output when ``kept_output``): saved graph + gradients in flight."""
    saved = layer_saved(settings, w, tokens, recompute=recompute, kept_output=kept_output)
    mlp_tokens = min(tokens, settings.mlp_tile_tokens or tokens)
    tile = 0
    if settings.mlp_tile_tokens is not None:
        tile = mlp_tokens * mlp_saved_widths(settings) * BF16 * w.i  # one tile's recomputed activations
    # MLP phase, at the product's backward: d(down's input), d(act), d(up) live while the down projection's
    # saved input is already freed (net two intermediate-wide tensors over the saved ones), plus the
    # output's and the input's gradients
    mlp_phase = tile + mlp_tokens * 2 * BF16 * w.i + tokens * 2 * BF16 * w.h
    mlp_saved = tokens * BF16 * w.h
    if not settings.mlp_tile_tokens:
        mlp_saved += tokens * mlp_saved_widths(settings) * BF16 * w.i
    if settings.chunk_size is None:
        # attention phase: d(out), dq/dk/dv, the kernel's fp32 dq and dk/dv accumulators (the query heads of a
        # GQA group sum into their kv head's; measured: an 8-layer slice at 1.57M tokens on an H200 peaked 12.7 GiB
        # over the arithmetic without them, alstcmp_probe8ds_*), the residual gradient
        attention_phase = tokens * (BF16 * (2 * w.q + 2 * w.kv) + FP32 * (w.q + 2 * w.kv) + 2 * BF16 * w.h)
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
    else:  # the last layer keeps its activations: no recompute, but its backward's gradients in flight
        working = _layer_backward(run, settings, w, tokens, recompute=False)
        layer["layer_working_set"] = working["mlp_working_set"] + working["attention_working_set"]
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
    kept_output = keeps_output(layer, run, settings)
    if _layer_offloaded(layer, settings) or (kept_output and settings.fpdt_offload):
        # brought back for the recompute: its input (and the one prefetched next), its kept output
        back = 0
        if _layer_offloaded(layer, settings):  # and, with a layer before it, that layer's input prefetched
            back += min(2, layer + 1) * tokens * BF16 * w.h
        if kept_output:
            back += kept_bytes(tokens, w)
        parts["offload_prefetch"] = back
    if not keeps_input(layer, settings) and not _layer_offloaded(layer, settings):
        # its input, rebuilt by rerunning the layer before it (whose forward's working set is smaller than this
        # backward's, and whose input is freed when the rerun returns)
        parts["rebuilt_input"] = tokens * BF16 * w.h
    parts.update(_layer_backward(run, settings, w, tokens, recompute=True, kept_output=kept_output))
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
