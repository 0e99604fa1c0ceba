"""The hybrid schedule: Ulysses all-to-all inside a group, ring attention across groups, pipelined by heads.

Forward posts the all-to-alls of every head chunk at once; NCCL runs them in order beside the compute, so
chunk ``c+1`` arrives while chunk ``c`` goes through the ring, and chunk ``c``'s output travels back
while chunk ``c+1`` computes. Backward mirrors it: dout chunks arrive ahead, dq/dk/dv chunks leave behind.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch

from ..comm.all_to_all import heads_to_seq_start, seq_to_heads_start
from ..comm.ring import RingComm
from ..layout import ZigzagLayout
from ..memory.attention_stash import rerun_output, stash_call
from .documents import Documents
from .ring import ring_backward, ring_forward
from .ulysses import HeadChunk


class SavedHeadChunk(NamedTuple):
    """What the backward of one head chunk reads: its head-scattered ``q``, ``k``, ``v``, ``out`` and ``lse``
    (they travel through ``ctx.save_for_backward`` flattened, chunk after chunk)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def unflatten(cls, saved: Sequence[torch.Tensor]) -> List["SavedHeadChunk"]:
        width = len(cls._fields)
        return [cls(*saved[at:at + width]) for at in range(0, len(saved), width)]


class _Gathered(NamedTuple):
    """A head chunk's all-to-alls in flight: q, k, v, and on a replay the kept output (else None)."""

    q: object
    k: object
    v: object
    out: Optional[object]


class _Args(NamedTuple):
    """The non-tensor arguments of one call, for the backward."""

    topo: object
    chunks: List[HeadChunk]
    causal: bool
    scale: float
    kv_heads: int
    docs: Optional[Documents]


def _whole(topo, chunks: List[HeadChunk]) -> bool:
    """One rank per Ulysses group and one head chunk: no all-to-all, the ring's result is the output."""
    return topo.ulysses == 1 and len(chunks) == 1


class HybridAttention(torch.autograd.Function):
    """q ``[B, s, H, D]``, k/v ``[B, s, Hkv, D]`` (this rank's zigzag piece) -> out ``[B, s, H, D]``;
    ``docs``: packed documents (:class:`~ds_longctx.attention.documents.Documents`) or None."""

    @staticmethod
    def forward(ctx, q, k, v, topo, chunks: List[HeadChunk], causal, scale, docs=None):
        group, rank = topo.ulysses_group, topo.ulysses_rank
        ring, layout = RingComm(topo), ZigzagLayout.of(topo)
        H = q.shape[2]
        whole = _whole(topo, chunks)
        # Inside a rematerialization-aware checkpoint the recompute takes out/lse from the forward's run and
        # only redoes the all-to-alls that rebuild the head-scattered tensors the backward reads.
        key = ("hybrid", tuple(q.shape), tuple(k.shape), q.dtype, causal, scale, len(chunks), docs)
        rebuilt = rerun_output(key)  # a rerun that rebuilds the next layer's input: the kept output, nothing else
        if rebuilt is not None:
            return rebuilt
        call = stash_call(key)
        kept = call.replayed() if call is not None else None
        incoming = [_Gathered(seq_to_heads_start(q, c.q_ranges, group, rank),
                              seq_to_heads_start(k, c.kv_ranges, group, rank),
                              seq_to_heads_start(v, c.kv_ranges, group, rank),
                              None if kept is None or whole else seq_to_heads_start(kept.out, c.q_ranges, group, rank))
                    for c in chunks]
        out = torch.empty_like(q) if not whole and kept is None else None
        outgoing, saved, lses = [], [], []
        for i, (c, pend) in enumerate(zip(chunks, incoming)):
            qc, kc, vc = pend.q.wait(), pend.k.wait(), pend.v.wait()
            if kept is not None:
                oc, lse = kept.out if whole else pend.out.wait(), kept.lses[i]
            else:
                oc, lse = ring_forward(qc, kc, vc, ring=ring, layout=layout, kernel=c.kernel, causal=causal,
                                       scale=scale, docs=docs)
            saved += SavedHeadChunk(qc, kc, vc, oc, lse)
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
        elif call is not None:
            call.record(out, lses)
        ctx.save_for_backward(*saved)
        ctx.args = _Args(topo, chunks, causal, scale, k.shape[2], docs)
        return out

    @staticmethod
    def backward(ctx, dout):
        topo, chunks, causal, scale, kv_heads, docs = ctx.args
        group, rank = topo.ulysses_group, topo.ulysses_rank
        ring, layout = RingComm(topo), ZigzagLayout.of(topo)
        dout = dout.contiguous()
        B, s, H, D = dout.shape
        saved = SavedHeadChunk.unflatten(ctx.saved_tensors)
        incoming = [seq_to_heads_start(dout, c.q_ranges, group, rank) for c in chunks]
        whole = _whole(topo, chunks)
        if not whole:
            dq = torch.empty_like(dout)  # every head is written by exactly one chunk
            dk = torch.zeros((B, s, kv_heads, D), dtype=dout.dtype, device=dout.device)
            dv = torch.zeros_like(dk)
        outgoing = []
        for c, pend, sv in zip(chunks, incoming, saved):
            dqc, dkc, dvc = ring_backward(pend.wait(), sv.q, sv.k, sv.v, sv.out, sv.lse, ring=ring, layout=layout,
                                          kernel=c.kernel, causal=causal, scale=scale, docs=docs)
            if whole:
                return dqc, dkc, dvc, None, None, None, None, None
            outgoing += [heads_to_seq_start(dqc, c.q_ranges, group, rank, H, into=dq),
                         # kv heads replicated to several ranks sum their gradients
                         heads_to_seq_start(dkc, c.kv_ranges, group, rank, kv_heads, into=dk, accumulate=True),
                         heads_to_seq_start(dvc, c.kv_ranges, group, rank, kv_heads, into=dv, accumulate=True)]
        for p in outgoing:
            p.wait()
        return dq, dk, dv, None, None, None, None, None
