"""Ring attention over the ring group, with the zigzag causal schedule.

Every rank holds the queries and K/V of its group sequence. Over ``R`` steps the K/V blocks rotate
(async P2P, next block in flight while the current one computes); each step runs the local kernel on the
rows and columns the layout's schedule names and folds the partial result into the running output through
its log-sum-exp. Backward walks the same schedule with the final ``out``/``lse``: dQ accumulates at home,
while dK/dV accumulate in a buffer that travels with the K/V (one step behind) and, after a last hop,
arrives back at the rank that owns them. ``R = 1`` is the plain local kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..comm.ring import RingComm
from ..kernels.base import Kernel
from ..layout import ZigzagLayout, ring_source
from .documents import Documents, block_backward, block_forward, slice_runs
from .merge import accumulation_dtype, merge_


def ring_forward(q, k, v, *, ring: RingComm, layout: ZigzagLayout, kernel: Kernel, causal: bool, scale: float,
                 docs: Optional[Documents] = None):
    """q ``[B, S, h, D]``, k/v ``[B, S, hk, D]`` -> out ``[B, S, h, D]`` (q's dtype), lse ``[B, h, S]``.
    ``docs``: packed documents (attention stays inside each)."""
    S = q.shape[1]
    runs = [layout.group_runs(S * ring.size, r) for r in range(ring.size)]
    if ring.size == 1:  # nothing to merge: the kernel's own result, no fp32 staging
        blk = layout.ring_block(0, 0, causal, S)
        return block_forward(kernel, docs, q, k, v, q_runs=runs[0], k_runs=runs[0], causal=blk.causal, scale=scale)
    acc = accumulation_dtype(q.dtype)
    out = lse = None
    kv = (k, v)
    for step in range(ring.size):
        if step + 1 < ring.size:
            incoming, pending = ring.exchange(kv)
        blk = layout.ring_block(step, ring.rank, causal, S)
        src = ring_source(ring.rank, step, ring.size)
        b_out, b_lse = block_forward(kernel, docs, q[:, blk.q], kv[0][:, blk.kv], kv[1][:, blk.kv],
                                     q_runs=slice_runs(runs[ring.rank], blk.q), k_runs=slice_runs(runs[src], blk.kv),
                                     causal=blk.causal, scale=scale)
        if out is None:  # step 0 covers every row (each row sees itself)
            out, lse = b_out.to(acc), b_lse.to(acc)
        else:
            merge_(out[:, blk.q], lse[:, :, blk.q], b_out, b_lse)
        if step + 1 < ring.size:
            ring.wait(pending)
            kv = incoming
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, *, ring: RingComm, layout: ZigzagLayout, kernel: Kernel,
                  causal: bool, scale: float, docs: Optional[Documents] = None):
    """Gradients ``(dq, dk, dv)`` shaped like ``(q, k, v)``, for the final ``out``/``lse`` of :func:`ring_forward`."""
    S = q.shape[1]
    runs = [layout.group_runs(S * ring.size, r) for r in range(ring.size)]
    if ring.size == 1:
        blk = layout.ring_block(0, 0, causal, S)
        return block_backward(kernel, docs, dout, q, k, v, out, lse, q_runs=runs[0], k_runs=runs[0],
                              causal=blk.causal, scale=scale)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = (k, v)
    dkv = None
    dkv_pending = None
    for step in range(ring.size):
        if step + 1 < ring.size:
            incoming, pending = ring.exchange(kv)
        blk = layout.ring_block(step, ring.rank, causal, S)
        src = ring_source(ring.rank, step, ring.size)
        b_dq, b_dk, b_dv = block_backward(kernel, docs, dout[:, blk.q], q[:, blk.q], kv[0][:, blk.kv],
                                          kv[1][:, blk.kv], out[:, blk.q], lse[:, :, blk.q],
                                          q_runs=slice_runs(runs[ring.rank], blk.q),
                                          k_runs=slice_runs(runs[src], blk.kv), causal=blk.causal, scale=scale)
        dq[:, blk.q] += b_dq
        if step == 0:
            dkv = [torch.zeros(k.shape, dtype=acc, device=k.device),
                   torch.zeros(v.shape, dtype=acc, device=v.device)]
        else:
            ring.wait(dkv_pending)  # the partial dK/dV of this step's K/V owner, from the previous rank
            dkv = dkv_incoming
        dkv[0][:, blk.kv] += b_dk
        dkv[1][:, blk.kv] += b_dv
        if ring.size > 1:
            # After the last step this hop takes the buffer home to its owner.
            dkv_incoming, dkv_pending = ring.exchange(dkv)
        if step + 1 < ring.size:
            ring.wait(pending)
            kv = incoming
    if ring.size > 1:
        ring.wait(dkv_pending)
        dkv = dkv_incoming
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)
