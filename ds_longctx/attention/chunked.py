"""FPDT-style chunked attention: per-chunk Ulysses all-to-all, chunked ring, double-buffered K/V offload.

Inputs are in the chunked zigzag layout (:func:`ds_longctx.layout.shard` with ``chunk_size=C``): the
group sequence ``G`` of ring position ``r`` (``L = S / R`` tokens) is cut into ``n = L / C`` chunks and
local rows ``[i*c, (i+1)*c)`` (``c = C / U``) of every Ulysses rank all-to-all into chunk ``i`` of ``G``
(``C`` tokens, this rank's heads).

Forward, for each query chunk ``i`` (its all-to-all and the next chunk's in flight together):
  * K/V chunks are gathered (per-chunk all-to-all) just before they are first needed and stored, on the
    device or offloaded to pinned host memory (:class:`~ds_longctx.memory.ChunkStore`).
  * Blocks run in "groups" ``k = 0 .. G(i)-1``: in group ``k`` the queries see this group's K/V chunk
    ``k`` (``k < i`` fully, ``k == i`` with the causal diagonal; all chunks without a causal mask) and, for
    ring step ``s`` with ``src = (r - s) mod R``, the rows of ``src``'s chunk ``k`` that the zigzag
    schedule makes visible (``src < r``: rows in ``src``'s early half; ``src > r``: every row, for query rows
    in ``r``'s late half). Each rank sends its chunk ``k`` to every ``dst = (r + s) mod R`` that needs
    it and receives what it needs, group ``k + 1`` in flight while group ``k`` computes. Both ends derive
    the transfer from :class:`ChunkSchedule`, so sends and receives pair up; group indices are global
    (a group with nothing to move on one rank is still a step of the same sequence), so the messages on
    every directed pair of ranks are issued in one order on both ends.
  * Partial results merge in fp32 through their log-sum-exp; the finished output chunk goes home with
    the reverse all-to-all while the next chunk computes. Saved per chunk: ``q_i``, ``out_i`` (q dtype),
    ``lse_i`` (fp32) and the K/V chunks, all offloaded with ``offload=True``.

Backward walks the same schedule, query chunk outer and K/V chunk inner, with the *final* ``out_i`` and
``lse_i`` (exact). ``dq_i`` accumulates on the device (one chunk) and leaves when the chunk is done. The
blocks on a remote K/V chunk send its partial ``dK``/``dV`` back to the owner (reverse direction, one
group behind); the owner adds them, together with its own block's, into an fp32 accumulator per own
chunk: one read-modify-write per (query chunk, K/V chunk) pair, through the host with offload. This order
moves ``2 * Hkv`` fp32 accumulator heads per pair where the K/V-outer order (FPDT's) moves ``q``, ``out``,
``dout`` (``3 * H`` heads) plus an fp32 ``dq`` (``H`` heads): for GQA the query-outer order moves less, and
it mirrors the forward, so the ring transfers are the forward's. The accumulators go home at the end.

GPU working set beyond the caller's tensors: ``O(R)`` chunks (two K/V chunks per ring peer in flight,
two fetched own chunks, one query chunk's ``q``/``out``/``lse``/``dq``/``dout``, two dK/dV accumulators),
independent of ``S``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..comm.all_to_all import heads_to_seq_start, seq_to_heads_start
from ..kernels.base import Kernel
from ..memory.chunk_store import ChunkStore, side_stream
from ..memory.host_pool import HostPool, default_pool
from ..layout import ZigzagLayout
from ..memory.remat import active_stash
from .documents import Documents, block_backward, block_forward, slice_runs
from .merge import merge_

EVERY = slice(None)
Block = Tuple[slice, slice]  # (rows of the query chunk, rows of the K/V chunk) that see each other fully


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(sl: slice, C: int) -> int:
    return len(range(*sl.indices(C)))


class ChunkSchedule:
    """What query chunk ``i`` of ring rank ``r`` computes: a pure function of ``(n, C, R, causal)`` and the
    ranks, so the two ends of every transfer compute the same answer."""

    def __init__(self, n: int, chunk: int, ring: int, ring_rank: int, causal: bool):
        self.n, self.C, self.R, self.r, self.causal = n, chunk, ring, ring_rank, causal
        self.half = n * chunk // 2  # the zigzag halves of the group sequence (early chunk r, late chunk 2R-1-r)

    def own(self, i: int, k: int) -> Optional[bool]:
        """The causal flag of the block of query chunk ``i`` on the rank's own K/V chunk ``k``, None if invisible."""
        if not self.causal:
            return False
        return None if k > i else k == i

    def sees(self, q_rank: int, kv_rank: int, i: int, k: int) -> Optional[Block]:
        """The fully visible rows of query chunk ``i`` of ``q_rank`` and K/V chunk ``k`` of ``kv_rank != q_rank``."""
        if not self.causal:
            return EVERY, EVERY
        C, half = self.C, self.half
        if kv_rank < q_rank:  # every query sees kv_rank's early half only
            return None if k * C >= half else (EVERY, slice(0, min(C, half - k * C)))
        # kv_rank > q_rank: only the late-half queries see kv_rank, all of it
        return None if (i + 1) * C <= half else (slice(max(0, half - i * C), C), EVERY)

    def groups(self, i: int) -> int:
        """Number of K/V chunk indices ``k`` that query chunk ``i`` steps through (the same on every ring rank)."""
        own = i + 1 if self.causal else self.n
        if self.R == 1:
            return own
        if not self.causal or (i + 1) * self.C > self.half:
            return self.n
        return -(-self.half // self.C)

    def dst(self, s: int) -> int:
        return (self.r + s) % self.R

    def src(self, s: int) -> int:
        return (self.r - s) % self.R


class _Transfer:
    """Group ``k`` of one query chunk: this rank's fetched K/V chunk, the remote K/V rows in flight."""

    def __init__(self, own, mine, sent_to, got, works, keep, streams):
        self.own, self.mine, self.sent_to, self.got = own, mine, sent_to, got
        self._works, self._keep, self._streams = works, keep, streams

    def wait(self):
        for w in self._works:
            w.wait()
        self._works, self._keep = [], None  # sent buffers may go once the transfer is done
        if self._streams is not None:
            stream = torch.cuda.current_stream()
            for item in self.got:  # received on the side stream, read on this one
                for t in item[-2:]:
                    t.record_stream(stream)
        return self


class _Pipeline:
    """The static plan of one call: shapes, ranks, heads, schedule, and the transfers built from them."""

    def __init__(self, q, k, topo, kernel: Kernel, q_ranges, kv_ranges, causal, scale, chunk_size, offload,
                 pool: Optional[HostPool], docs: Optional[Documents]):
        self.topo, self.kernel, self.causal, self.scale = topo, kernel, causal, scale
        self.q_ranges, self.kv_ranges = q_ranges, kv_ranges
        self.group, self.urank = topo.ulysses_group, topo.ulysses_rank
        self.ring_group, self.ring_ranks = topo.ring_group, topo.ring_ranks
        B, s_loc, H, D = q.shape
        U = topo.ulysses
        self.B, self.H, self.Hkv, self.D = B, H, k.shape[2], D
        self.C, self.c = chunk_size, chunk_size // U
        self.n = s_loc * U // chunk_size
        qa, qb = q_ranges[self.urank]
        ka, kb = kv_ranges[self.urank]
        self.h, self.hk = qb - qa, kb - ka
        self.dtype, self.acc, self.device = q.dtype, _acc(q.dtype), q.device
        self.sched = ChunkSchedule(self.n, chunk_size, topo.ring, topo.ring_rank, causal)
        self.steps = range(1, topo.ring)
        self.offload = offload
        self.pool = (pool or default_pool()) if offload else None
        self.docs = docs
        layout = ZigzagLayout(topo.ring, U)
        self.runs = [layout.group_runs(self.n * chunk_size * topo.ring, r) for r in range(topo.ring)]

    def chunk_runs(self, ring_rank: int, i: int, rows: slice = EVERY):
        """Global positions of rows ``rows`` of chunk ``i`` of ``ring_rank``'s group sequence (packed documents)."""
        if self.docs is None:
            return None
        return slice_runs(slice_runs(self.runs[ring_rank], slice(i * self.C, (i + 1) * self.C)), rows)

    def rows(self, i: int) -> slice:
        """Local rows of chunk ``i`` (this rank's ``C / U`` tokens of it)."""
        return slice(i * self.c, (i + 1) * self.c)

    def store(self, specs, lease) -> ChunkStore:
        return ChunkStore(self.n, specs, self.device, lease)

    def kv_spec(self, dtype):
        return [((self.B, self.C, self.hk, self.D), dtype)] * 2

    def post_kv(self, i: int, k: int, kv: ChunkStore) -> _Transfer:
        """Fetch own K/V chunk ``k`` if anyone needs it and post group ``k``'s ring transfers."""
        sc, R = self.sched, self.topo.ring
        own = sc.own(i, k)
        sends = [(s, blk) for s in self.steps for blk in [sc.sees(sc.dst(s), sc.r, i, k)] if blk]
        recvs = [(s, blk) for s in self.steps for blk in [sc.sees(sc.r, sc.src(s), i, k)] if blk]
        mine = kv.fetch(k) if own is not None or sends else None
        ops, keep, got = [], [], []
        if R > 1:
            # Issued from the prefetch stream: a host->device fetch feeding a send never stalls the kernels.
            with side_stream(kv.streams):
                if sends:
                    km, vm = mine.use()
                for s, (_, ks) in sends:
                    for t in (km, vm):
                        t = t[:, ks].contiguous()
                        keep.append(t)
                        ops.append(dist.P2POp(dist.isend, t, self.ring_ranks[sc.dst(s)], self.ring_group))
                for s, (qs, ks) in recvs:
                    shape = (self.B, _rows(ks, self.C), self.hk, self.D)
                    kb = torch.empty(shape, dtype=self.dtype, device=self.device)
                    vb = torch.empty(shape, dtype=self.dtype, device=self.device)
                    for t in (kb, vb):
                        ops.append(dist.P2POp(dist.irecv, t, self.ring_ranks[sc.src(s)], self.ring_group))
                    got.append((s, qs, ks, kb, vb))
                works = dist.batch_isend_irecv(ops) if ops else []
        else:
            works = []
        return _Transfer(own, mine, [(s, blk[1]) for s, blk in sends], got, works, keep, kv.streams)

    def post_grads(self, back, sent_to) -> _Transfer:
        """Send partial dK/dV of remote chunks home (to ``src``); receive those of this rank's chunk from ``dst``."""
        sc = self.sched
        ops, keep, got = [], [], []
        for s, gk, gv in back:
            for t in (gk, gv):
                keep.append(t)
                ops.append(dist.P2POp(dist.isend, t, self.ring_ranks[sc.src(s)], self.ring_group))
        for s, ks in sent_to:
            shape = (self.B, _rows(ks, self.C), self.hk, self.D)
            gk = torch.empty(shape, dtype=self.acc, device=self.device)
            gv = torch.empty(shape, dtype=self.acc, device=self.device)
            for t in (gk, gv):
                ops.append(dist.P2POp(dist.irecv, t, self.ring_ranks[sc.dst(s)], self.ring_group))
            got.append((s, ks, gk, gv))
        works = dist.batch_isend_irecv(ops) if ops else []
        return _Transfer(None, None, [], got, works, keep, None)


class _Ahead:
    """Posts a list of all-to-alls in order, ``depth`` ahead of the one being consumed."""

    def __init__(self, posts: Sequence, depth: int = 2):
        self.posts, self.depth, self.pending, self.next = list(posts), depth, {}, 0

    def take(self, t: int):
        while self.next < len(self.posts) and self.next <= t + self.depth:
            self.pending[self.next] = self.posts[self.next]()
            self.next += 1
        return self.pending.pop(t)


def _gather_jobs(p: _Pipeline) -> List[Tuple[str, int]]:
    """All-to-alls in the order the forward consumes them: each K/V chunk just before the first query chunk
    that needs it (its own diagonal, or a ring peer's visible rows), then that query chunk."""
    jobs, have = [], 0
    for i in range(p.n):
        need = p.sched.groups(i)
        jobs += [("kv", j) for j in range(have, need)]
        have = max(have, need)
        jobs.append(("q", i))
    return jobs


class ChunkedAttention(torch.autograd.Function):
    """q ``[B, s, H, D]``, k/v ``[B, s, Hkv, D]`` (this rank's piece of the chunked zigzag layout) ->
    out ``[B, s, H, D]``. See the module docstring for the schedule."""

    @staticmethod
    def forward(ctx, q, k, v, topo, kernel, q_ranges, kv_ranges, causal, scale, chunk_size, offload, save,
                pool=None, docs=None):
        p = _Pipeline(q, k, topo, kernel, q_ranges, kv_ranges, causal, scale, chunk_size, offload, pool, docs)
        # In a checkpointed region (ds_longctx.memory.remat) the forward run keeps no chunks: the recompute
        # builds them and hands them over through the stash (with kept outputs it runs no kernel, only the
        # all-to-alls and K/V stores the backward reads).
        stash = active_stash()
        call = stash.call(("chunked", tuple(q.shape), tuple(k.shape), q.dtype, causal, scale, chunk_size,
                           docs)) \
            if stash is not None else None
        replaying = call is not None and stash.replaying
        kept = call.kept() if replaying else None
        keep_state = save and (call is None or replaying)
        lease = p.pool.lease() if offload else None
        kv = p.store(p.kv_spec(p.dtype), lease)
        saved = p.store([((p.B, p.C, p.h, p.D), p.dtype)] * 2 + [((p.B, p.h, p.C), p.acc)], lease) \
            if keep_state else None
        G, grp = p.group, p.urank

        def post(job):
            kind, j = job
            if kind == "kv":
                return (seq_to_heads_start(k[:, p.rows(j)], kv_ranges, G, grp),
                        seq_to_heads_start(v[:, p.rows(j)], kv_ranges, G, grp))
            if kept is not None:
                return (seq_to_heads_start(q[:, p.rows(j)], q_ranges, G, grp),
                        seq_to_heads_start(kept.out[:, p.rows(j)], q_ranges, G, grp))
            return (seq_to_heads_start(q[:, p.rows(j)], q_ranges, G, grp),)

        jobs = _gather_jobs(p)
        ahead = _Ahead([lambda job=job: post(job) for job in jobs])
        out = torch.empty_like(q) if kept is None else kept.out.detach()
        t, outgoing, lses = 0, None, []
        for i in range(p.n):
            while jobs[t][0] == "kv":
                kv.put(jobs[t][1], [w.wait() for w in ahead.take(t)])
                t += 1
            pend_q = ahead.take(t)
            q_i = pend_q[0].wait()
            t += 1
            if kept is not None:
                if keep_state:
                    saved.put(i, (q_i, pend_q[1].wait(), kept.lses[i]))
                continue
            o_acc = lse_acc = None
            n_groups = p.sched.groups(i)
            pend = p.post_kv(i, 0, kv)
            for kk in range(n_groups):
                nxt = p.post_kv(i, kk + 1, kv) if kk + 1 < n_groups else None
                blocks, r = [], p.sched.r
                if pend.own is not None:
                    km, vm = pend.mine.use()
                    blocks.append((EVERY, block_forward(kernel, p.docs, q_i, km, vm, p.chunk_runs(r, i),
                                                        p.chunk_runs(r, kk), pend.own, scale)))
                pend.wait()
                for s, qs, ks, kb, vb in pend.got:
                    blocks.append((qs, block_forward(kernel, p.docs, q_i[:, qs], kb, vb, p.chunk_runs(r, i, qs),
                                                     p.chunk_runs(p.sched.src(s), kk, ks), False, scale)))
                for qs, (b_out, b_lse) in blocks:
                    if o_acc is None:  # own chunk 0 comes first and covers every row (not every document)
                        o_acc, lse_acc = b_out.to(p.acc), b_lse.to(p.acc)
                    else:
                        merge_(o_acc[:, qs], lse_acc[:, :, qs], b_out, b_lse, empty_rows=p.docs is not None)
                pend = nxt
            o_i = o_acc.to(q.dtype)
            if outgoing is not None:
                outgoing.wait()  # one output chunk in flight at a time
            outgoing = heads_to_seq_start(o_i, q_ranges, G, grp, p.H, into=out[:, p.rows(i)])
            if keep_state:
                saved.put(i, (q_i, o_i, lse_acc))
            if call is not None:
                lses.append(lse_acc)
        if outgoing is not None:
            outgoing.wait()
        if call is not None and stash.keep_output and not replaying:
            # with offload the kept output goes to host memory too: the GPU keeps no attention state
            call.keep(out, lses, stash.lease(p.pool))
        ctx.call = call
        ctx.state = None
        if keep_state:
            ctx.state = _State(p, kv, saved, lease)
            if call is not None:
                call.state = ctx.state
        else:
            kv.close()
            if lease is not None:
                lease.release()
        # One token tensor through autograd's saved tensors, so that a checkpoint's backward unpacks it
        # (and so recomputes the region) before this node looks for the recompute's state.
        ctx.save_for_backward(torch.empty(0, device=q.device))
        return out

    @staticmethod
    def backward(ctx, dout):
        ctx.saved_tensors  # noqa: B018 - under a checkpoint this recomputes the region, which hands over the state
        state, ctx.state = ctx.state, None
        # The node outlives its backward (the caller's loss keeps the graph into the next step); so would the
        # stash entry, and with it the kept output fetched back to the device, if the node kept it.
        call, ctx.call = ctx.call, None
        if state is None and call is not None:
            state = call.take_state()
        elif call is not None:
            call.state = None
        if state is None:
            raise RuntimeError("chunked attention: backward ran twice, or after a forward without grad; its "
                               "chunks are released after the first backward (retain_graph is not supported)")
        p, kv, saved = state.p, state.kv, state.saved
        kernel, scale = p.kernel, p.scale
        G, grp = p.group, p.urank
        dout = dout.contiguous()
        dq = torch.empty_like(dout)  # every head of every row comes back from exactly one rank's chunk
        dk = torch.zeros((p.B, dout.shape[1], p.Hkv, p.D), dtype=dout.dtype, device=dout.device)
        dv = torch.zeros_like(dk)
        acc_lease = p.pool.lease() if p.offload else None
        dkv = p.store(p.kv_spec(p.acc), acc_lease)
        ahead = _Ahead([lambda i=i: seq_to_heads_start(dout[:, p.rows(i)], p.q_ranges, G, grp)
                        for i in range(p.n)])
        try:
            outgoing = None
            for i in range(p.n):
                cur = saved.fetch(i)
                if i + 1 < p.n:
                    saved.prefetch(i + 1)
                q_i, o_i, l_i = cur.use()
                do_i = ahead.take(i).wait()
                dq_i = torch.zeros((p.B, p.C, p.h, p.D), dtype=p.acc, device=dout.device)
                n_groups = p.sched.groups(i)
                pend, behind = p.post_kv(i, 0, kv), None
                for kk in range(n_groups):
                    nxt = p.post_kv(i, kk + 1, kv) if kk + 1 < n_groups else None
                    base = dkv.fetch(kk) if (pend.own is not None or pend.sent_to) and dkv.has(kk) else None
                    contrib, r = [], p.sched.r
                    if pend.own is not None:
                        km, vm = pend.mine.use()
                        g_q, g_k, g_v = block_backward(kernel, p.docs, do_i, q_i, km, vm, o_i, l_i, p.chunk_runs(r, i),
                                                       p.chunk_runs(r, kk), pend.own, scale)
                        dq_i += g_q
                        contrib.append((EVERY, g_k, g_v))
                    pend.wait()
                    back = []
                    for s, qs, ks, kb, vb in pend.got:
                        g_q, g_k, g_v = block_backward(kernel, p.docs, do_i[:, qs], q_i[:, qs], kb, vb, o_i[:, qs],
                                                       l_i[:, :, qs], p.chunk_runs(r, i, qs),
                                                       p.chunk_runs(p.sched.src(s), kk, ks), False, scale)
                        dq_i[:, qs] += g_q
                        back.append((s, g_k.to(p.acc).contiguous(), g_v.to(p.acc).contiguous()))
                    returning = p.post_grads(back, pend.sent_to)
                    if behind is not None:
                        _accumulate(p, dkv, *behind)
                    behind = (kk, returning, contrib, base)
                    pend = nxt
                if behind is not None:
                    _accumulate(p, dkv, *behind)
                if outgoing is not None:
                    outgoing.wait()
                outgoing = heads_to_seq_start(dq_i.to(dout.dtype), p.q_ranges, G, grp, p.H, into=dq[:, p.rows(i)])
            outgoing.wait()
            back_k = back_v = None
            for j in range(p.n):
                cur = dkv.fetch(j)
                if j + 1 < p.n:
                    dkv.prefetch(j + 1)
                ak, av = cur.use()
                for w in (back_k, back_v):
                    if w is not None:
                        w.wait()
                # kv heads replicated to several ranks sum their gradients
                back_k = heads_to_seq_start(ak.to(dout.dtype), p.kv_ranges, G, grp, p.Hkv, into=dk[:, p.rows(j)],
                                            accumulate=True)
                back_v = heads_to_seq_start(av.to(dout.dtype), p.kv_ranges, G, grp, p.Hkv, into=dv[:, p.rows(j)],
                                            accumulate=True)
            back_k.wait()
            back_v.wait()
        finally:
            for store in (kv, saved, dkv):
                store.close()
            for lease in (state.lease, acc_lease):
                if lease is not None:
                    lease.release()
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


class _State:
    """What the backward reads: the plan, the K/V chunk store, the saved q/out/lse store, their host lease."""

    def __init__(self, p: _Pipeline, kv: ChunkStore, saved: ChunkStore, lease):
        self.p, self.kv, self.saved, self.lease = p, kv, saved, lease


def _accumulate(p: _Pipeline, dkv: ChunkStore, k: int, returning: _Transfer, contrib, base) -> None:
    """Add this group's dK/dV contributions to own chunk ``k`` (fp32, out of place: the stored copy may
    still be read by its offload copy) and store the sum."""
    returning.wait()
    parts = list(contrib) + [(ks, gk, gv) for _, ks, gk, gv in returning.got]
    if not parts:
        return
    shape = (p.B, p.C, p.hk, p.D)
    tk = torch.zeros(shape, dtype=p.acc, device=p.device)
    tv = torch.zeros(shape, dtype=p.acc, device=p.device)
    if base is not None:
        bk, bv = base.use()
        tk += bk
        tv += bv
    for ks, gk, gv in parts:
        tk[:, ks] += gk
        tv[:, ks] += gv
    dkv.put(k, (tk, tv))


def chunked_attention(q, k, v, topo, kernel: Kernel, q_ranges, kv_ranges, causal: bool, scale: float,
                      chunk_size: int, offload: bool, pool: Optional[HostPool] = None,
                      docs: Optional[Documents] = None) -> torch.Tensor:
    """FPDT chunked attention on inputs in the chunked zigzag layout (validated by the caller).

    q ``[B, S_local, H, D]``, k/v ``[B, S_local, Hkv, D]`` -> ``[B, S_local, H, D]``. ``q_ranges``/``kv_ranges``
    are the Ulysses head ranges per rank and ``kernel`` the local kernel for this rank's heads (see
    :class:`~ds_longctx.attention.ulysses.UlyssesPlan`). ``pool``: host pool for ``offload`` (default:
    :func:`ds_longctx.memory.default_pool`). ``docs``: packed documents, attention stays inside each.
    """
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return ChunkedAttention.apply(q, k, v, topo, kernel, list(q_ranges), list(kv_ranges), causal, scale,
                                  chunk_size, offload, save, pool, docs)


__all__ = ["ChunkSchedule", "ChunkedAttention", "chunked_attention"]
