"""The hybrid schedule: Ulysses all-to-all inside a group, ring attention across groups, pipelined by heads.

Forward posts the all-to-alls of every head chunk at once; NCCL runs them in order beside the compute, so
chunk ``c+1`` arrives while chunk ``c`` goes through the ring, and chunk ``c``'s output travels back
while chunk ``c+1`` computes. Backward mirrors it: dout chunks arrive ahead, dq/dk/dv chunks leave behind.
"""
from __future__ import annotations

from typing import List

import torch

from ..comm.all_to_all import heads_to_seq_start, seq_to_heads_start
from ..comm.ring import RingComm
from ..layout import ZigzagLayout
from ..memory.remat import active_stash
from .ring import ring_backward, ring_forward
from .ulysses import HeadChunk


class HybridAttention(torch.autograd.Function):
    """q ``[B, s, H, D]``, k/v ``[B, s, Hkv, D]`` (this rank's zigzag piece) -> out ``[B, s, H, D]``;
    ``docs``: packed documents (:class:`~ds_longctx.attention.documents.Documents`) or None."""

    @staticmethod
    def forward(ctx, q, k, v, topo, chunks: List[HeadChunk], causal, scale, docs=None):
        group, rank = topo.ulysses_group, topo.ulysses_rank
        ring, layout = RingComm(topo), ZigzagLayout.of(topo)
        H = q.shape[2]
        single = topo.ulysses == 1 and len(chunks) == 1
        # Inside a rematerialization-aware checkpoint the recompute takes out/lse from the forward's run and
        # only redoes the all-to-alls that rebuild the head-scattered tensors the backward reads.
        stash = active_stash()
        call = stash.call(("hybrid", tuple(q.shape), tuple(k.shape), q.dtype, causal, scale, len(chunks),
                           docs)) \
            if stash is not None else None
        kept = call.kept() if call is not None and stash.replaying else None
        incoming = [(seq_to_heads_start(q, c.q_ranges, group, rank), seq_to_heads_start(k, c.kv_ranges, group, rank),
                     seq_to_heads_start(v, c.kv_ranges, group, rank),
                     None if kept is None or single else seq_to_heads_start(kept.out, c.q_ranges, group, rank))
                    for c in chunks]
        out = torch.empty_like(q) if not single and kept is None else None
        outgoing, saved, lses = [], [], []
        for i, (c, pend) in enumerate(zip(chunks, incoming)):
            qc, kc, vc = (p.wait() for p in pend[:3])
            if kept is not None:
                oc, lse = kept.out if single else pend[3].wait(), kept.lses[i]
            else:
                oc, lse = ring_forward(qc, kc, vc, ring, layout, c.kernel, causal, scale, docs)
            saved += [qc, kc, vc, oc, lse]
            lses.append(lse)
            if kept is not None:
                continue
            if out is None:
                out = oc
            else:
                outgoing.append(heads_to_seq_start(oc, c.q_ranges, group, rank, H, into=out))
        for p in outgoing:
            p.wait()
        if kept is not None:
            out = kept.out.detach()  # an alias of its own, so the stash's tensor gets no autograd history
        elif call is not None and stash.keep_output and not stash.replaying:
            call.keep(out, lses, stash.lease())
        ctx.save_for_backward(*saved)
        ctx.args = (topo, chunks, causal, scale, k.shape[2], docs)
        return out

    @staticmethod
    def backward(ctx, dout):
        topo, chunks, causal, scale, Hkv, docs = ctx.args
        group, rank = topo.ulysses_group, topo.ulysses_rank
        ring, layout = RingComm(topo), ZigzagLayout.of(topo)
        dout = dout.contiguous()
        B, s, H, D = dout.shape
        saved = ctx.saved_tensors
        incoming = [seq_to_heads_start(dout, c.q_ranges, group, rank) for c in chunks]
        single = topo.ulysses == 1 and len(chunks) == 1
        if not single:
            dq = torch.empty_like(dout)  # every head is written by exactly one chunk
            dk = torch.zeros((B, s, Hkv, D), dtype=dout.dtype, device=dout.device)
            dv = torch.zeros_like(dk)
        outgoing = []
        for i, (c, pend) in enumerate(zip(chunks, incoming)):
            qc, kc, vc, oc, lse = saved[5 * i:5 * i + 5]
            dqc, dkc, dvc = ring_backward(pend.wait(), qc, kc, vc, oc, lse, ring, layout, c.kernel, causal, scale,
                                          docs)
            if single:
                return dqc, dkc, dvc, None, None, None, None, None
            outgoing += [heads_to_seq_start(dqc, c.q_ranges, group, rank, H, into=dq),
                         # kv heads replicated to several ranks sum their gradients
                         heads_to_seq_start(dkc, c.kv_ranges, group, rank, Hkv, into=dk, accumulate=True),
                         heads_to_seq_start(dvc, c.kv_ranges, group, rank, Hkv, into=dv, accumulate=True)]
        for p in outgoing:
            p.wait()
        return dq, dk, dv, None, None, None, None, None
