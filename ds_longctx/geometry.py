"""FPDT chunk geometry: sizes, counts and the blocks each chunk pair computes, from plain ints.

The chunked attention (:mod:`ds_longctx.attention.chunked`), its tests and the memory planner read the same
object, so the numbers they use cannot drift apart. Nothing here needs a tensor or a process group.

Inputs are in the chunked zigzag layout (:class:`~ds_longctx.layout.ZigzagLayout` with ``chunk_size``): the
group sequence of ring position ``r`` (``group_len = S / R`` tokens) is cut into ``chunks = group_len /
chunk_tokens`` chunks, and each Ulysses rank holds ``local_chunk_tokens = chunk_tokens / U`` rows of every
chunk, which one all-to-all gathers into the chunk (this rank's heads, every token).

Query chunk ``i`` of ring rank ``r`` steps through K/V chunk indices ``k = 0 .. kv_steps(i) - 1``: at step
``k`` it sees its own K/V chunk ``k`` (the causal diagonal at ``k == i``) and, from every ring peer, the
rows of the peer's chunk ``k`` that the layout's visibility rule (:meth:`ZigzagLayout.visible`) makes
visible. ``kv_steps`` is the same on every ring rank (a step with nothing to move on one rank is still a
step of the sequence), so both ends of every transfer issue their messages in one order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

from .layout import EVERY, RingBlock, ZigzagLayout, ring_dest, ring_source


class RingTransfer(NamedTuple):
    """K/V rows that travel between two ring ranks at one step of a query chunk: ``peer`` is the
    destination of a send or the source of a receive; ``block`` names the rows on both sides (chunk-local)."""

    step: int
    peer: int
    block: RingBlock


def _within(rows: slice, start: int, size: int, group_len: int) -> Optional[slice]:
    """The rows of ``rows`` (a slice of a group sequence) inside the chunk ``[start, start + size)``, as
    chunk-local rows (:data:`EVERY` for the whole chunk), or None if there are none."""
    first, stop, _ = rows.indices(group_len)
    lo, hi = max(first, start) - start, min(stop, start + size) - start
    if hi <= lo:
        return None
    return EVERY if (lo, hi) == (0, size) else slice(lo, hi)


class ChunkSchedule:
    """What query chunk ``i`` of ring rank ``ring_rank`` computes, and what it sends and receives: a pure
    function of ``(chunks, chunk_tokens, ring, causal)`` and the ranks, so the two ends of every transfer
    compute the same answer. ``layout``: the load balancer whose visibility rule it reads (zigzag)."""

    def __init__(self, n: int, chunk: int, ring: int, ring_rank: int, causal: bool,
                 layout: Optional[ZigzagLayout] = None):
        self.chunks, self.chunk_tokens, self.ring, self.ring_rank, self.causal = n, chunk, ring, ring_rank, causal
        self.layout = layout if layout is not None else ZigzagLayout(ring, 1)
        self.group_len = n * chunk
        # The visible rows of every rank pair, over whole group sequences: the layout's rule, asked once.
        self._visible = {(a, b): self.layout.visible(a, b, causal, self.group_len)
                         for a in range(ring) for b in range(ring)}
        self._steps = [self._count_steps(i) for i in range(n)]

    def block(self, q_rank: int, kv_rank: int, i: int, k: int) -> Optional[RingBlock]:
        """The rows of query chunk ``i`` of ``q_rank`` and K/V chunk ``k`` of ``kv_rank`` that see each other
        (chunk-local; ``causal``: the diagonal, only on a rank's own chunk ``k == i``), or None."""
        seen = self._visible[(q_rank, kv_rank)]
        if seen is None:
            return None
        C = self.chunk_tokens
        if seen.causal:  # the own group sequence runs in ascending positions: chunk k is before chunk i iff k < i
            return None if k > i else RingBlock(EVERY, EVERY, k == i)
        q_rows = _within(seen.q, i * C, C, self.group_len)
        kv_rows = _within(seen.kv, k * C, C, self.group_len)
        if q_rows is None or kv_rows is None:
            return None
        return RingBlock(q_rows, kv_rows, False)

    def own(self, i: int, k: int) -> Optional[bool]:
        """The causal flag of the block of query chunk ``i`` on the rank's own K/V chunk ``k`` (whole chunks),
        None if invisible."""
        blk = self.block(self.ring_rank, self.ring_rank, i, k)
        return None if blk is None else blk.causal

    def sees(self, q_rank: int, kv_rank: int, i: int, k: int) -> Optional[Tuple[slice, slice]]:
        """``(query rows, K/V rows)`` of chunk ``i`` of ``q_rank`` and chunk ``k`` of ``kv_rank != q_rank``
        that see each other fully, or None."""
        blk = self.block(q_rank, kv_rank, i, k)
        return None if blk is None else (blk.q, blk.kv)

    def _count_steps(self, i: int) -> int:
        last = -1  # the last K/V chunk any rank pair sees from query chunk i
        C = self.chunk_tokens
        for (q_rank, kv_rank), seen in self._visible.items():
            if seen is None:
                continue
            if seen.causal:
                last = max(last, i)
                continue
            if _within(seen.q, i * C, C, self.group_len) is None:
                continue
            _, stop, _ = seen.kv.indices(self.group_len)
            last = max(last, -(-stop // C) - 1)
        return last + 1

    def groups(self, i: int) -> int:
        """Number of K/V chunk steps ``k`` that query chunk ``i`` walks (the same on every ring rank)."""
        return self._steps[i]

    def dst(self, step: int) -> int:
        return ring_dest(self.ring_rank, step, self.ring)

    def src(self, step: int) -> int:
        return ring_source(self.ring_rank, step, self.ring)

    def sends(self, i: int, k: int) -> List[RingTransfer]:
        """The rows of this rank's K/V chunk ``k`` that query chunk ``i`` of each ring peer sees."""
        sent = [RingTransfer(s, self.dst(s), self.block(self.dst(s), self.ring_rank, i, k)) for s in range(1, self.ring)]
        return [t for t in sent if t.block is not None]

    def receives(self, i: int, k: int) -> List[RingTransfer]:
        """The rows of each ring peer's K/V chunk ``k`` that this rank's query chunk ``i`` sees."""
        got = [RingTransfer(s, self.src(s), self.block(self.ring_rank, self.src(s), i, k)) for s in range(1, self.ring)]
        return [t for t in got if t.block is not None]


class WorkingSet(NamedTuple):
    """Device buffers of one rank's chunked attention call beyond the caller's tensors, in chunk-sized
    buffers of one tensor each (``[B, chunk_tokens, heads, D]``; an lse is ``[B, heads, chunk_tokens]``).

    ``q_heads``: buffers with this rank's query heads, in q's dtype; ``kv_heads``: with its K/V heads, in
    q's dtype; ``fp32_q_heads`` / ``fp32_kv_heads``: fp32 accumulators (fp64 for fp64 inputs) and
    log-sum-exps; ``per_chunk``: additional buffers for each of the ``chunks`` chunks, kept for the whole
    call (what offload moves to host memory; zero with offload).
    """

    q_heads: int
    kv_heads: int
    fp32_q_heads: int
    fp32_kv_heads: int
    per_chunk_q_heads: int
    per_chunk_kv_heads: int
    per_chunk_fp32_q_heads: int
    per_chunk_fp32_kv_heads: int


@dataclass(frozen=True)
class ChunkGeometry:
    """The shape of one FPDT call: ``seq_len`` global tokens over ``ring`` x ``ulysses`` ranks, chunks of
    ``chunk_size`` tokens of each ring position's group sequence. Raises
    :class:`~ds_longctx.layout.LayoutError` for lengths the layout cannot split."""

    seq_len: int
    ulysses: int
    ring: int
    chunk_size: int
    causal: bool = True

    def __post_init__(self):
        ZigzagLayout(self.ring, self.ulysses, self.chunk_size).check(self.seq_len)

    @property
    def group_len(self) -> int:
        """Tokens of one ring position's group sequence (``S / R``)."""
        return self.seq_len // self.ring

    @property
    def chunk_tokens(self) -> int:
        """Tokens of one chunk after its all-to-all (``C``)."""
        return self.chunk_size

    @property
    def local_chunk_tokens(self) -> int:
        """Rows of one chunk on one Ulysses rank before its all-to-all (``C / U``)."""
        return self.chunk_size // self.ulysses

    @property
    def chunks(self) -> int:
        """Chunks per ring position (``n = S / (R * C)``)."""
        return self.group_len // self.chunk_size

    @property
    def local_len(self) -> int:
        """Tokens per rank (``S / (R * U)``)."""
        return self.seq_len // (self.ring * self.ulysses)

    def local_rows(self, i: int) -> slice:
        """This rank's local rows of chunk ``i`` (its ``C / U`` tokens of the chunk)."""
        c = self.local_chunk_tokens
        return slice(i * c, (i + 1) * c)

    def schedule(self, ring_rank: int) -> ChunkSchedule:
        """What each query chunk of ``ring_rank`` computes, sends and receives."""
        return ChunkSchedule(self.chunks, self.chunk_size, self.ring, ring_rank, self.causal)

    def kv_steps(self, i: int) -> int:
        """K/V chunk steps of query chunk ``i`` (the same on every ring rank)."""
        return self.schedule(0).groups(i)

    def block(self, q_rank: int, kv_rank: int, i: int, k: int) -> Optional[RingBlock]:
        """The rows query chunk ``i`` of ring rank ``q_rank`` computes against K/V chunk ``k`` of ``kv_rank``
        (chunk-local slices; ``causal`` on the diagonal), or None."""
        return self.schedule(q_rank).block(q_rank, kv_rank, i, k)

    def working_set(self, offload: bool) -> Tuple[WorkingSet, WorkingSet]:
        """``(forward, backward)`` device buffers of one call (:class:`WorkingSet`), as the code allocates
        them at its peak (the largest a buffer can be: a remote block of fewer rows counts as a chunk).

        Forward: the all-to-alls run three jobs ahead (each a K/V pair or one query chunk: 3 x 2 K/V
        buffers); two K/V steps are in flight, each holding the fetched own K/V chunk and, per ring peer, a
        received K/V pair and a sent contiguous copy (``2 x (2 + 4 (R - 1))``); one query chunk's ``q``, its
        fp32 output and lse, its output in q's dtype and the previous one still travelling home. Without
        offload every K/V chunk and every query chunk's ``q``, ``out`` and lse stay until backward.

        Backward: the query chunk's ``q``, ``out``, lse (the fetched one and the prefetched next), three
        ``dout`` all-to-alls ahead, its fp32 ``dq`` and its outgoing copy, the previous one travelling home;
        the same two K/V steps in flight; per ring peer a partial fp32 dK/dV pair sent home and one received,
        for the step computing and the one behind it (``2 x 4 (R - 1)``); the fetched dK/dV accumulator
        and the new sum (4 fp32 K/V buffers) and the own block's dK/dV. Without offload every chunk's dK/dV
        accumulator stays until the end of the call.
        """
        R = self.ring
        peers = R - 1
        resident = 0 if offload else 1  # chunks a store keeps on the device
        kv_in_flight = 2 * (2 + 4 * peers)  # two steps: own K/V pair, a received and a sent pair per peer
        forward = WorkingSet(
            q_heads=1 + 2,  # q_i; o_i and the previous o_i on its way home
            kv_heads=3 * 2 + kv_in_flight,
            fp32_q_heads=2,  # output and lse accumulators
            fp32_kv_heads=0,
            per_chunk_q_heads=2 * resident,  # saved q and out of every chunk
            per_chunk_kv_heads=2 * resident,  # every K/V chunk
            per_chunk_fp32_q_heads=resident,  # saved lse
            per_chunk_fp32_kv_heads=0,
        )
        backward = WorkingSet(
            q_heads=2 * 2 + 3 + 2,  # q/out fetched and prefetched; dout three ahead; dq out and the previous one
            kv_heads=kv_in_flight + 2,  # the own block's dK/dV in q's dtype
            fp32_q_heads=2 * 1 + 1,  # lse fetched and prefetched; dq accumulator
            fp32_kv_heads=2 * 4 * peers + 2 * 2,  # partial dK/dV out and in, two steps; accumulator and sum
            per_chunk_q_heads=2 * resident,
            per_chunk_kv_heads=2 * resident,
            per_chunk_fp32_q_heads=resident,
            per_chunk_fp32_kv_heads=2 * resident,  # the dK/dV accumulators
        )
        return forward, backward


__all__ = ["ChunkGeometry", "ChunkSchedule", "RingTransfer", "WorkingSet"]
