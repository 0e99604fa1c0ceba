"""FPDT-style chunked attention: per-chunk Ulysses all-to-all, chunked ring, double-buffered K/V offload.

Inputs are in the chunked zigzag layout (:func:`ds_longctx.layout.shard` with ``chunk_size=C``); the sizes
and the blocks every chunk pair computes are the :class:`~ds_longctx.geometry.ChunkGeometry`'s: ``n`` chunks
of ``C`` tokens per ring position, local rows ``[i*C/U, (i+1)*C/U)`` of every Ulysses rank all-to-all into
chunk ``i`` (``C`` tokens, this rank's heads).

Forward, for each query chunk ``i`` (its all-to-all and the next chunk's in flight together):
  * K/V chunks are gathered (per-chunk all-to-all) just before they are first needed and stored, on the
    device or offloaded to pinned host memory (:class:`~ds_longctx.memory.ChunkStore`).
  * The query chunk walks K/V steps ``k = 0 .. kv_steps(i) - 1``: at step ``k`` it sees its own K/V chunk
    ``k`` and the rows of each ring peer's chunk ``k`` that the layout's visibility rule makes visible. Each
    rank sends its chunk ``k``'s rows to every peer that sees them and receives what it sees, step ``k + 1``
    in flight while step ``k`` computes. Both ends derive the transfer from the
    :class:`~ds_longctx.geometry.ChunkSchedule`, so sends and receives pair up; step indices are global
    (a step with nothing to move on one rank is still a step of the same sequence), so the messages on
    every directed pair of ranks are issued in one order on both ends.
  * Partial results merge in fp32 through their log-sum-exp; the finished output chunk goes home with
    the reverse all-to-all while the next chunk computes. Saved per chunk: ``q_i``, ``out_i`` (q dtype),
    ``lse_i`` (fp32) and the K/V chunks, all offloaded with ``offload=True``.

Backward walks the same schedule, query chunk outer and K/V chunk inner, with the *final* ``out_i`` and
``lse_i`` (exact). ``dq_i`` accumulates on the device (one chunk) and leaves when the chunk is done. The
blocks on a remote K/V chunk send its partial ``dK``/``dV`` back to the owner (reverse direction, one
step behind); the owner adds them, together with its own block's, into an fp32 accumulator per own
chunk: one read-modify-write per (query chunk, K/V chunk) pair, through the host with offload. This order
moves ``2 * Hkv`` fp32 accumulator heads per pair where the K/V-outer order (FPDT's) moves ``q``, ``out``,
``dout`` (``3 * H`` heads) plus an fp32 ``dq`` (``H`` heads): for GQA the query-outer order moves less, and
it mirrors the forward, so the ring transfers are the forward's. The accumulators go home at the end.

GPU working set beyond the caller's tensors, with offload: ``O(R)`` chunks (two K/V steps in flight, each
with the fetched own chunk and a K/V pair per ring peer, two query chunks' saved ``q``/``out``/``lse``, the
``dq`` of this chunk and the last, the dK/dV sums of two steps), independent of ``S``; without offload the
stores keep every chunk on the device. :meth:`ChunkGeometry.working_set
<ds_longctx.geometry.ChunkGeometry.working_set>` counts it, checked against the tensors this code holds
(tests/test_geometry.py): a change here that holds a buffer longer shows there.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from ..comm.all_to_all import heads_to_seq_start, seq_to_heads_start
from ..geometry import ChunkSchedule
from ..kernels.base import Kernel
from ..layout import EVERY
from ..memory.chunk_store import ChunkStore
from ..memory.host_pool import HostPool
from ..memory.attention_stash import keep_for_backward, rerun_output, stash_call, take_for_backward
from .chunk_gather import Ahead, Gathers
from .chunk_plan import (ChunkedOptions, ChunkPlan, KVChunk, KVGrads, KVStep, PartialGrads, ReturningGrads,
                         SavedQueryChunk)
from .documents import Documents, block_backward, block_forward
from .merge import merge_


def _attend(plan: ChunkPlan, i: int, q_i: torch.Tensor, kv: ChunkStore):
    """Query chunk ``i`` over every K/V step: its output and lse in the accumulation dtype."""
    kernel, scale, r = plan.kernel, plan.opts.scale, plan.schedule.ring_rank
    out = lse = None
    steps = plan.schedule.kv_steps(i)
    step = plan.post_kv(i, 0, kv)
    for k in range(steps):
        following = plan.post_kv(i, k + 1, kv) if k + 1 < steps else None
        blocks = []
        if step.own is not None:
            k_own, v_own = step.mine.use()
            blocks.append((EVERY, block_forward(kernel, plan.docs, q_i, k_own, v_own, q_runs=plan.chunk_runs(r, i),
                                                k_runs=plan.chunk_runs(r, k), causal=step.own, scale=scale)))
        step.wait()
        for got in step.received:
            q_rows, kv_rows = got.transfer.block.q, got.transfer.block.kv
            blocks.append((q_rows, block_forward(kernel, plan.docs, q_i[:, q_rows], got.k, got.v,
                                                 q_runs=plan.chunk_runs(r, i, q_rows),
                                                 k_runs=plan.chunk_runs(got.transfer.peer, k, kv_rows),
                                                 causal=False, scale=scale)))
        for q_rows, (b_out, b_lse) in blocks:
            if out is None:  # own chunk 0 comes first and covers every row (not every document)
                out, lse = b_out.to(plan.acc_dtype), b_lse.to(plan.acc_dtype)
            else:
                merge_(out[:, q_rows], lse[:, :, q_rows], b_out, b_lse, empty_rows=plan.docs is not None)
        step = following
    return out, lse


class _State:
    """What the backward reads: the plan, the K/V chunk store, the saved query chunk store, their host lease."""

    def __init__(self, plan: ChunkPlan, kv: ChunkStore, saved: ChunkStore, lease):
        self.plan, self.kv, self.saved, self.lease = plan, kv, saved, lease


class _PendingSum(NamedTuple):
    """K/V step ``k``'s gradients of own chunk ``k``, added once the peers' partials are back."""

    k: int
    returning: ReturningGrads
    own: List[KVGrads]
    base: Optional[object]  # the accumulator so far (a fetched chunk), None before the first contribution


def _accumulate(plan: ChunkPlan, dkv: ChunkStore, pending: _PendingSum) -> None:
    """Add a step's dK/dV contributions to own chunk ``k`` (fp32, out of place: the stored copy may still be
    read by its offload copy) and store the sum."""
    parts = list(pending.own) + pending.returning.wait()
    if not parts:
        return
    shape = (plan.batch, plan.chunk_tokens, plan.local_kv_heads, plan.head_dim)
    total_k = torch.zeros(shape, dtype=plan.acc_dtype, device=plan.device)
    total_v = torch.zeros(shape, dtype=plan.acc_dtype, device=plan.device)
    if pending.base is not None:
        base_k, base_v = pending.base.use()
        total_k += base_k
        total_v += base_v
    for part in parts:
        total_k[:, part.kv_rows] += part.dk
        total_v[:, part.kv_rows] += part.dv
    dkv.put(pending.k, KVChunk(total_k, total_v))


def _backprop(plan: ChunkPlan, i: int, saved: SavedQueryChunk, do_i: torch.Tensor, kv: ChunkStore,
              dkv: ChunkStore) -> torch.Tensor:
    """Query chunk ``i`` over every K/V step: its ``dq`` (accumulation dtype); the K/V chunks' gradients go
    into ``dkv`` (own blocks, and the peers' partials coming home one step behind)."""
    kernel, scale, r = plan.kernel, plan.opts.scale, plan.schedule.ring_rank
    q_i, o_i, l_i = saved
    dq_i = torch.zeros((plan.batch, plan.chunk_tokens, plan.local_heads, plan.head_dim), dtype=plan.acc_dtype,
                       device=plan.device)
    steps = plan.schedule.kv_steps(i)
    step: KVStep = plan.post_kv(i, 0, kv)
    behind = None
    for k in range(steps):
        following = plan.post_kv(i, k + 1, kv) if k + 1 < steps else None
        base = dkv.fetch(k) if (step.own is not None or step.sent) and dkv.has(k) else None
        own = []
        if step.own is not None:
            k_own, v_own = step.mine.use()
            g_q, g_k, g_v = block_backward(kernel, plan.docs, do_i, q_i, k_own, v_own, o_i, l_i,
                                           q_runs=plan.chunk_runs(r, i), k_runs=plan.chunk_runs(r, k),
                                           causal=step.own, scale=scale)
            dq_i += g_q
            own.append(KVGrads(EVERY, g_k, g_v))
        step.wait()
        partials = []
        for got in step.received:
            q_rows, kv_rows = got.transfer.block.q, got.transfer.block.kv
            g_q, g_k, g_v = block_backward(kernel, plan.docs, do_i[:, q_rows], q_i[:, q_rows], got.k, got.v,
                                           o_i[:, q_rows], l_i[:, :, q_rows], q_runs=plan.chunk_runs(r, i, q_rows),
                                           k_runs=plan.chunk_runs(got.transfer.peer, k, kv_rows), causal=False,
                                           scale=scale)
            dq_i[:, q_rows] += g_q
            partials.append(PartialGrads(got.transfer, KVGrads(kv_rows, g_k.to(plan.acc_dtype).contiguous(),
                                                               g_v.to(plan.acc_dtype).contiguous())))
        returning = plan.post_grads(partials, step.sent)
        if behind is not None:
            _accumulate(plan, dkv, behind)
        behind = _PendingSum(k, returning, own, base)
        step = following
    if behind is not None:
        _accumulate(plan, dkv, behind)
    return dq_i


def _send_kv_grads_home(plan: ChunkPlan, dkv: ChunkStore, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """The dK/dV accumulators back to the callers' layout (reverse all-to-all, one chunk in flight)."""
    opts, topo = plan.opts, plan.topo
    group, rank = topo.ulysses_group, topo.ulysses_rank
    back_k = back_v = None
    for j in range(plan.chunks):
        cur = dkv.fetch(j)
        if j + 1 < plan.chunks:
            dkv.prefetch(j + 1)
        acc_k, acc_v = cur.use()
        for w in (back_k, back_v):
            if w is not None:
                w.wait()
        rows = plan.local_rows(j)
        # kv heads replicated to several ranks sum their gradients
        back_k = heads_to_seq_start(acc_k.to(dk.dtype), opts.kv_ranges, group, rank, plan.kv_heads,
                                    into=dk[:, rows], accumulate=True)
        back_v = heads_to_seq_start(acc_v.to(dv.dtype), opts.kv_ranges, group, rank, plan.kv_heads,
                                    into=dv[:, rows], accumulate=True)
    back_k.wait()
    back_v.wait()


class ChunkedAttention(torch.autograd.Function):
    """q ``[B, s, H, D]``, k/v ``[B, s, Hkv, D]`` (this rank's piece of the chunked zigzag layout) ->
    out ``[B, s, H, D]``. See the module docstring for the schedule."""

    @staticmethod
    def forward(ctx, q, k, v, opts: ChunkedOptions):
        key = ("chunked", tuple(q.shape), tuple(k.shape), q.dtype, opts.causal, opts.scale, opts.chunk_size, opts.docs)
        rebuilt = rerun_output(key)  # a rerun that rebuilds the next layer's input: the kept output, nothing else
        if rebuilt is not None:
            return rebuilt
        plan = ChunkPlan(q, k, opts)
        topo = opts.topo
        # In a checkpointed region (ds_longctx.memory.remat) the forward run keeps no chunks: the recompute
        # builds them and hands them over through the stash (with kept outputs it runs no kernel, only the
        # all-to-alls and K/V stores the backward reads).
        call = stash_call(key)
        kept = call.replayed() if call is not None else None
        keep_state = opts.save and (call is None or call.replaying)
        lease = plan.pool.lease() if opts.offload else None
        kv = plan.kv_store(plan.dtype, lease)
        saved = plan.saved_store(lease) if keep_state else None
        gathers = Gathers(plan, q, k, v, kept)
        out = torch.empty_like(q) if kept is None else kept.out.detach()
        outgoing, lses = None, []
        for i in range(plan.chunks):
            pending = gathers.query_chunk(kv)
            q_i = pending.q.wait()
            if kept is not None:
                if keep_state:
                    saved.put(i, SavedQueryChunk(q_i, pending.out.wait(), kept.lses[i]))
                continue
            o_acc, lse_acc = _attend(plan, i, q_i, kv)
            o_i = o_acc.to(q.dtype)
            if outgoing is not None:
                outgoing.wait()  # one output chunk in flight at a time
            outgoing = heads_to_seq_start(o_i, opts.q_ranges, topo.ulysses_group, topo.ulysses_rank, plan.heads,
                                          into=out[:, plan.local_rows(i)])
            if keep_state:
                saved.put(i, SavedQueryChunk(q_i, o_i, lse_acc))
            if call is not None:
                lses.append(lse_acc)
        if outgoing is not None:
            outgoing.wait()
        if call is not None:
            # with offload the kept output goes to host memory too: the GPU keeps no attention state
            call.record(out, lses, plan.pool)
        state = None
        if keep_state:
            state = _State(plan, kv, saved, lease)
        else:
            kv.close()
            if lease is not None:
                lease.release()
        keep_for_backward(ctx, call, state, q.device)
        return out

    @staticmethod
    def backward(ctx, dout):
        state = take_for_backward(ctx)
        if state is None:
            raise RuntimeError("chunked attention: backward ran twice, or after a forward without grad; its "
                               "chunks are released after the first backward (retain_graph is not supported)")
        plan, kv, saved = state.plan, state.kv, state.saved
        opts, topo = plan.opts, plan.topo
        group, rank = topo.ulysses_group, topo.ulysses_rank
        dout = dout.contiguous()
        dq = torch.empty_like(dout)  # every head of every row comes back from exactly one rank's chunk
        dk = torch.zeros((plan.batch, dout.shape[1], plan.kv_heads, plan.head_dim), dtype=dout.dtype,
                         device=dout.device)
        dv = torch.zeros_like(dk)
        acc_lease = plan.pool.lease() if opts.offload else None
        dkv = plan.kv_store(plan.acc_dtype, acc_lease)
        ahead = Ahead([lambda i=i: seq_to_heads_start(dout[:, plan.local_rows(i)], opts.q_ranges, group, rank)
                        for i in range(plan.chunks)])
        try:
            outgoing = None
            for i in range(plan.chunks):
                cur = saved.fetch(i)
                if i + 1 < plan.chunks:
                    saved.prefetch(i + 1)
                chunk = SavedQueryChunk(*cur.use())
                do_i = ahead.take(i).wait()
                dq_i = _backprop(plan, i, chunk, do_i, kv, dkv)
                if outgoing is not None:
                    outgoing.wait()
                outgoing = heads_to_seq_start(dq_i.to(dout.dtype), opts.q_ranges, group, rank, plan.heads,
                                              into=dq[:, plan.local_rows(i)])
            outgoing.wait()
            _send_kv_grads_home(plan, dkv, dk, dv)
        finally:
            for store in (kv, saved, dkv):
                store.close()
            for lease in (state.lease, acc_lease):
                if lease is not None:
                    lease.release()
        return dq, dk, dv, None


def chunked_attention(q, k, v, topo, *, kernel: Kernel, q_ranges, kv_ranges, causal: bool, scale: float,
                      chunk_size: int, offload: bool, pool: Optional[HostPool] = None,
                      docs: Optional[Documents] = None) -> torch.Tensor:
    """FPDT chunked attention on inputs in the chunked zigzag layout (validated by the caller).

    q ``[B, S_local, H, D]``, k/v ``[B, S_local, Hkv, D]`` -> ``[B, S_local, H, D]``. ``q_ranges``/``kv_ranges``
    are the Ulysses head ranges per rank and ``kernel`` the local kernel for this rank's heads (see
    :class:`~ds_longctx.attention.ulysses.UlyssesPlan`). ``pool``: host pool for ``offload`` (default:
    :func:`ds_longctx.memory.default_pool`). ``docs``: packed documents, attention stays inside each.
    """
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    opts = ChunkedOptions(topo=topo, kernel=kernel, q_ranges=list(q_ranges), kv_ranges=list(kv_ranges),
                          causal=causal, scale=scale, chunk_size=chunk_size, offload=offload, save=save, pool=pool,
                          docs=docs)
    return ChunkedAttention.apply(q, k, v, opts)


__all__ = ["ChunkSchedule", "ChunkedAttention", "chunked_attention"]
