"""The static plan of one FPDT call and the ring transfers built from it.

:class:`ChunkPlan` holds what a call fixes (shapes, heads, ranks, the :class:`~ds_longctx.geometry.ChunkGeometry`
and this rank's :class:`~ds_longctx.geometry.ChunkSchedule`); :meth:`ChunkPlan.post_kv` posts one K/V step's
transfers (this rank's chunk rows to the peers that see them, the peers' rows this rank sees) and
:meth:`ChunkPlan.post_grads` the partial dK/dV going back. Both ends of a transfer derive it from the same
schedule, so every send meets its receive.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from ..geometry import ChunkGeometry, RingTransfer
from ..kernels.base import Kernel
from ..layout import EVERY, ZigzagLayout
from ..memory.chunk_store import ChunkStore, Fetched, side_stream
from ..memory.host_pool import HostPool, default_pool
from .documents import Documents, slice_runs
from .merge import accumulation_dtype


class ChunkedOptions(NamedTuple):
    """What one call of :func:`~ds_longctx.attention.chunked.chunked_attention` asks for (one record, so
    that it travels through ``autograd.Function.apply``, which takes no keywords)."""

    topo: object
    kernel: Kernel
    q_ranges: List
    kv_ranges: List
    causal: bool
    scale: float
    chunk_size: int
    offload: bool
    save: bool  # whether the backward will run (grad enabled and an input requires it)
    pool: Optional[HostPool]
    docs: Optional[Documents]


class KVChunk(NamedTuple):
    """One K/V chunk (this rank's kv heads, every token of the chunk), or its dK/dV accumulators."""

    k: torch.Tensor
    v: torch.Tensor


class SavedQueryChunk(NamedTuple):
    """What the backward reads of query chunk ``i``: ``q`` and the final ``out`` (q dtype), ``lse`` (fp32)."""

    q: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


class RemoteKV(NamedTuple):
    """Rows of a ring peer's K/V chunk received for one step: ``transfer`` names the peer and the rows."""

    transfer: RingTransfer
    k: torch.Tensor
    v: torch.Tensor


class KVGrads(NamedTuple):
    """dK/dV of rows ``kv_rows`` of a K/V chunk (fp32 when they travel)."""

    kv_rows: slice
    dk: torch.Tensor
    dv: torch.Tensor


class PartialGrads(NamedTuple):
    """dK/dV computed here for a peer's K/V rows (going back to ``transfer.peer``)."""

    transfer: RingTransfer
    grads: KVGrads


class KVStep:
    """K/V step ``k`` of one query chunk: the own chunk's causal flag (None: invisible) and its fetched copy,
    what this rank sent, and the peers' rows in flight (valid after :meth:`wait`)."""

    def __init__(self, *, own: Optional[bool], mine: Optional[Fetched], sent: List[RingTransfer],
                 received: List[RemoteKV], in_flight: "InFlight"):
        self.own, self.mine, self.sent, self.received, self.in_flight = own, mine, sent, received, in_flight

    def wait(self) -> "KVStep":
        self.in_flight.wait([t for got in self.received for t in (got.k, got.v)])
        return self


class InFlight:
    """Posted point-to-point work and the sent buffers it reads (alive until it is done)."""

    def __init__(self, works: list, sent: list, streams):
        self._works, self._sent, self._streams = works, sent, streams

    def wait(self, received: Sequence[torch.Tensor] = ()) -> None:
        for w in self._works:
            w.wait()
        self._works, self._sent = [], None  # sent buffers may go once the transfer is done
        if self._streams is not None:
            stream = torch.cuda.current_stream()
            for t in received:  # received on the side stream, read on this one
                t.record_stream(stream)


class ReturningGrads(NamedTuple):
    """The partial dK/dV of this rank's K/V rows coming back from the peers that used them."""

    in_flight: InFlight
    received: List[KVGrads]

    def wait(self) -> List[KVGrads]:
        self.in_flight.wait()
        return self.received


def _rows(sl: slice, size: int) -> int:
    return len(range(*sl.indices(size)))


class ChunkPlan:
    """The static plan of one call on q ``[B, s, H, D]`` and k ``[B, s, Hkv, D]``: shapes, ranks, heads,
    geometry and schedule, and the transfers built from them."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, opts: ChunkedOptions):
        topo = opts.topo
        self.opts, self.topo, self.kernel, self.docs = opts, topo, opts.kernel, opts.docs
        self.batch, local_len, self.heads, self.head_dim = q.shape
        self.kv_heads = k.shape[2]
        self.geometry = ChunkGeometry(seq_len=local_len * topo.sp, ulysses=topo.ulysses, ring=topo.ring,
                                      chunk_size=opts.chunk_size, causal=opts.causal)
        self.schedule = self.geometry.schedule(topo.ring_rank)
        self.chunks, self.chunk_tokens = self.geometry.chunks, self.geometry.chunk_tokens
        # the heads this rank computes after the all-to-all
        q_first, q_end = opts.q_ranges[topo.ulysses_rank]
        kv_first, kv_end = opts.kv_ranges[topo.ulysses_rank]
        self.local_heads, self.local_kv_heads = q_end - q_first, kv_end - kv_first
        self.dtype, self.acc_dtype, self.device = q.dtype, accumulation_dtype(q.dtype), q.device
        self.pool = (opts.pool or default_pool()) if opts.offload else None
        layout = ZigzagLayout(topo.ring, topo.ulysses)
        self._runs = [layout.group_runs(self.geometry.seq_len, r) for r in range(topo.ring)]

    def chunk_runs(self, ring_rank: int, i: int, rows: slice = EVERY):
        """Global positions of rows ``rows`` of chunk ``i`` of ``ring_rank``'s group sequence (packed documents)."""
        if self.docs is None:
            return None
        C = self.chunk_tokens
        return slice_runs(slice_runs(self._runs[ring_rank], slice(i * C, (i + 1) * C)), rows)

    def local_rows(self, i: int) -> slice:
        return self.geometry.local_rows(i)

    def store(self, specs, lease) -> ChunkStore:
        return ChunkStore(self.chunks, specs, self.device, lease)

    def kv_store(self, dtype, lease) -> ChunkStore:
        """A store of :class:`KVChunk` (K/V in q's dtype, or dK/dV accumulators)."""
        return self.store([((self.batch, self.chunk_tokens, self.local_kv_heads, self.head_dim), dtype)] * 2, lease)

    def saved_store(self, lease) -> ChunkStore:
        """A store of :class:`SavedQueryChunk`."""
        shape = (self.batch, self.chunk_tokens, self.local_heads, self.head_dim)
        return self.store([(shape, self.dtype)] * 2 + [((self.batch, self.local_heads, self.chunk_tokens),
                                                        self.acc_dtype)], lease)

    def _kv_buffer(self, rows: slice, dtype) -> torch.Tensor:
        shape = (self.batch, _rows(rows, self.chunk_tokens), self.local_kv_heads, self.head_dim)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _p2p(self, op, t: torch.Tensor, peer: int):
        return dist.P2POp(op, t, self.topo.ring_ranks[peer], self.topo.ring_group)

    def post_kv(self, i: int, k: int, kv: ChunkStore) -> KVStep:
        """Fetch own K/V chunk ``k`` if anyone needs it and post step ``k``'s ring transfers."""
        own = self.schedule.own(i, k)
        sends, recvs = self.schedule.sends(i, k), self.schedule.receives(i, k)
        mine = kv.fetch(k) if own is not None or sends else None
        ops, sent, received = [], [], []
        if self.topo.ring > 1:
            # Issued from the prefetch stream: a host->device fetch feeding a send never stalls the kernels.
            with side_stream(kv.streams):
                if sends:
                    own_chunk = KVChunk(*mine.use())
                for transfer in sends:
                    for t in own_chunk:
                        t = t[:, transfer.block.kv].contiguous()
                        sent.append(t)
                        ops.append(self._p2p(dist.isend, t, transfer.peer))
                for transfer in recvs:
                    got = RemoteKV(transfer, self._kv_buffer(transfer.block.kv, self.dtype),
                                   self._kv_buffer(transfer.block.kv, self.dtype))
                    for t in (got.k, got.v):
                        ops.append(self._p2p(dist.irecv, t, transfer.peer))
                    received.append(got)
                works = dist.batch_isend_irecv(ops) if ops else []
        else:
            works = []
        return KVStep(own=own, mine=mine, sent=sends, received=received,
                      in_flight=InFlight(works, sent, kv.streams))

    def post_grads(self, partials: Sequence[PartialGrads], sent: Sequence[RingTransfer]) -> ReturningGrads:
        """Send partial dK/dV of the peers' rows home; receive those of this rank's rows ``sent`` to peers."""
        ops, kept, received = [], [], []
        for partial in partials:
            for t in (partial.grads.dk, partial.grads.dv):
                kept.append(t)
                ops.append(self._p2p(dist.isend, t, partial.transfer.peer))
        for transfer in sent:
            got = KVGrads(transfer.block.kv, self._kv_buffer(transfer.block.kv, self.acc_dtype),
                          self._kv_buffer(transfer.block.kv, self.acc_dtype))
            for t in (got.dk, got.dv):
                ops.append(self._p2p(dist.irecv, t, transfer.peer))
            received.append(got)
        works = dist.batch_isend_irecv(ops) if ops else []
        return ReturningGrads(InFlight(works, kept, None), received)


__all__ = ["ChunkPlan", "ChunkedOptions", "InFlight", "KVChunk", "KVGrads", "KVStep", "PartialGrads",
           "RemoteKV", "ReturningGrads", "SavedQueryChunk"]
