"""Distributed attention: Ulysses all-to-all inside a group, ring attention across groups.

``attention(q, k, v, topo)`` is exact: for inputs in the zigzag layout it equals single-device attention
over the full sequence, forward and backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import get_kernel
from ..topology import Topology
from .checks import check_inputs
from .chunked import chunked_attention
from .documents import Documents
from .hybrid import HybridAttention
from .ulysses import UlyssesPlan, head_chunks


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topo: Topology, causal: bool = True,
              softmax_scale: Optional[float] = None, kernel: str = "auto", chunk_size: Optional[int] = None,
              offload: bool = False, pipeline_chunks: int = 1, cu_seqlens=None) -> torch.Tensor:
    """Exact attention over the full sequence held in the zigzag layout by the sequence-parallel group.

    Args:
        q: ``[B, S_local, H, D]`` this rank's queries (``S_local = S / (ulysses * ring)``, see
            :func:`ds_longctx.layout.shard`).
        k, v: ``[B, S_local, Hkv, D]`` with ``H % Hkv == 0`` (MHA, GQA, MQA).
        topo: the :class:`~ds_longctx.topology.Topology`.
        causal: causal mask over global positions.
        softmax_scale: defaults to ``D ** -0.5``.
        kernel: local kernel name (see :func:`ds_longctx.kernels.kernel_names`), ``auto`` for the fastest.
        chunk_size: FPDT chunking in tokens of the group sequence (``S / ring`` tokens; None: no chunking).
            Must be a multiple of ``ulysses`` dividing ``S / ring``, and q, k, v must then be in the *chunked*
            layout: ``shard(x, topo, chunk_size=chunk_size)`` (positions from ``positions(S, topo,
            chunk_size=chunk_size)``); the output is in that layout too. Each chunk's all-to-all, ring
            transfers and attention run in turn, so the attention state on the device stays a few chunks.
        offload: keep K/V (and the saved q/out/lse) of chunks not in use in pinned host memory, copied on
            side streams with double-buffered prefetch (needs ``chunk_size``); host buffers come from
            :func:`ds_longctx.memory.default_pool`, reused across layers and steps.
        pipeline_chunks: the Ulysses all-to-all is pipelined over this many head chunks (whole GQA groups),
            so communication of one chunk overlaps the attention of another; 1 (the default) turns it off:
            over NVLink the all-to-all is small beside the kernel, and splitting the kernel into head chunks
            lowers its rate. ``bench/bench_attention.py --impls ulysses,ulysses_p2,ulysses_p4`` compares them.
        cu_seqlens: packed documents: the cumulative document lengths of the *full* sequence in global
            positions (``[0, len_0, len_0 + len_1, ..., S]``; a list, a 1-D integer tensor or a
            :class:`~ds_longctx.attention.documents.Documents`), the same on every rank and for every batch
            row. Each token then attends only to (earlier, with ``causal``) tokens of its own document, as
            flash-attn's varlen functions do with these boundaries. None: one document.

    Returns:
        ``[B, S_local, H, D]`` in q's dtype and layout.
    """
    check_inputs(q, k, v, topo, chunk_size, offload)
    docs = None if cu_seqlens is None else Documents.of(cu_seqlens, q.shape[1] * topo.sp)
    if docs is not None and docs.count == 1:
        docs = None  # one document: the plain schedule
    H, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    kern = get_kernel(kernel, q, k)
    plan = UlyssesPlan(H, Hkv, topo.ulysses, topo.ulysses_rank)
    if chunk_size is not None:
        return chunked_attention(q, k, v, topo, kernel=plan.local_kernel(kern), q_ranges=plan.q_ranges,
                                 kv_ranges=plan.kv_ranges, causal=causal, scale=scale, chunk_size=chunk_size,
                                 offload=offload, docs=docs)
    return HybridAttention.apply(q, k, v, topo, head_chunks(plan, kern, pipeline_chunks), causal, scale, docs)


__all__ = ["Documents", "attention"]
