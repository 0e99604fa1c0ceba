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
from functools import lru_cache
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

    def kv_steps(self, i: int) -> int:
        """Number of K/V chunk steps ``k`` that query chunk ``i`` walks (the same on every ring rank)."""
        return self._steps[i]

    groups = kv_steps  # its name before the steps were called steps (tests/test_chunked.py)

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


class Buffers(NamedTuple):
    """Device buffers live at one moment of one rank's FPDT forward or backward beyond the caller's tensors
    (q, k, v, dout and the outputs), in chunk-sized tensors.

    Units: a *q chunk* is ``[B, C, h, D]`` (this rank's query heads after the all-to-all), a *kv chunk*
    ``[B, C, hk, D]`` (one of K, V, dK, dV), an *lse* ``[B, h, C]``; ``acc_`` fields are in the accumulation
    dtype (fp32; fp64 for fp64 inputs), the others in q's dtype, lses in fp32. ``per_chunk_*`` fields are
    held for each of the ``chunks`` chunks (what ``offload`` moves to host memory; a negative constant
    beside them counts the chunks not reached yet at that moment), ``*_per_peer`` for each ring peer.
    """

    q: int
    acc_q: int
    kv: int
    acc_kv: int
    lse: int
    kv_per_peer: int = 0
    acc_kv_per_peer: int = 0
    q_per_peer: int = 0
    per_chunk_q: int = 0
    per_chunk_kv: int = 0
    per_chunk_lse: int = 0
    per_chunk_acc_kv: int = 0

    def nbytes(self, *, batch: int, chunk_tokens: int, heads: int, kv_heads: int, head_dim: int, chunks: int,
               ring: int, itemsize: int, acc_itemsize: int = 4) -> int:
        """Bytes of the buffers for this rank's ``heads`` / ``kv_heads`` after the all-to-all."""
        q_chunk, kv_chunk = batch * chunk_tokens * heads * head_dim, batch * chunk_tokens * kv_heads * head_dim
        lse = batch * heads * chunk_tokens
        peers = ring - 1
        q_like = (self.q + self.q_per_peer * peers + chunks * self.per_chunk_q) * q_chunk \
            + (self.kv + self.kv_per_peer * peers + chunks * self.per_chunk_kv) * kv_chunk
        acc = (self.acc_kv + self.acc_kv_per_peer * peers + chunks * self.per_chunk_acc_kv) * kv_chunk \
            + self.acc_q * q_chunk
        return q_like * itemsize + acc * acc_itemsize + (self.lse + chunks * self.per_chunk_lse) * lse * 4


class WorkingSet(NamedTuple):
    """The peak device buffers of one rank's FPDT forward or backward: the largest of the ``moments`` that can
    be it (which one depends on the sizes), each a :class:`Buffers`."""

    moments: Tuple[Buffers, ...]

    def nbytes(self, **sizes) -> int:
        """Bytes at the peak: :meth:`Buffers.nbytes` of the largest moment (same keywords)."""
        return max(m.nbytes(**sizes) for m in self.moments)

    @property
    def per_chunk_q(self) -> int:
        return max(m.per_chunk_q for m in self.moments)

    @property
    def per_chunk_kv(self) -> int:
        return max(m.per_chunk_kv for m in self.moments)

    @property
    def per_chunk_acc_kv(self) -> int:
        return max(m.per_chunk_acc_kv for m in self.moments)


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

    @lru_cache(maxsize=64)  # every layer of a model asks for the same few: built once, not per call
    def schedule(self, ring_rank: int) -> ChunkSchedule:
        """What each query chunk of ``ring_rank`` computes, sends and receives."""
        return ChunkSchedule(n=self.chunks, chunk=self.chunk_size, ring=self.ring, ring_rank=ring_rank,
                             causal=self.causal)

    def kv_steps(self, i: int) -> int:
        """K/V chunk steps of query chunk ``i`` (the same on every ring rank)."""
        return self.schedule(0).kv_steps(i)

    def block(self, q_rank: int, kv_rank: int, i: int, k: int) -> Optional[RingBlock]:
        """The rows query chunk ``i`` of ring rank ``q_rank`` computes against K/V chunk ``k`` of ``kv_rank``
        (chunk-local slices; ``causal`` on the diagonal), or None."""
        return self.schedule(q_rank).block(q_rank, kv_rank, i, k)

    def working_set(self, offload: bool) -> Tuple[WorkingSet, WorkingSet]:
        """``(forward, backward)`` peak device buffers of one rank's causal call (:class:`WorkingSet`), as
        :mod:`ds_longctx.attention.chunked` allocates them; the backward's include what the forward keeps
        for it. Measured against the tensors the code holds in tests/test_geometry.py: exact with one ring
        rank (with offload from ``OFFLOAD_STEADY_CHUNKS`` chunks; fewer hold less), the ring's buffers are
        upper bounds (a peer's block of fewer rows counts as a whole chunk).

        Forward peak: merging a block of a late query chunk: the running fp32 output and the previous chunk's
        (still bound while the next one runs), the merge's two fp32 temporaries, the block's output, the
        running, block and merge-weight lses; without offload every earlier chunk's saved ``out`` and lse;
        with offload the fetched own K/V chunks of two steps, the K/V store's resident chunk and the saved
        store's resident ``q`` copy, ``out`` and lse.

        Backward peak: summing a step's dK/dV: the fp32 ``dq`` of the chunk and the previous chunk's, the
        previous ``dq`` going home, the block's ``dq`` and the own block's dK/dV of two steps, the new fp32
        sum; without offload every chunk's dK/dV sum so far; with offload the fetched saved ``q``/``out``/
        lse of two query chunks and the resident ones, the fetched K/V of two steps and the resident chunk,
        the fetched dK/dV sums of two steps and the resident one.

        With one Ulysses rank an all-to-all is a view of the input. With more its results are new buffers
        (each chunk's ``q`` and, without offload, K/V), the query chunk in use keeps its send and receive
        buffers, the next one's are in flight (and the next K/V chunk's, forward; two ``dout`` chunks
        ahead, backward), and a chunk going home holds a send and a receive buffer; without offload the
        backward's peak is then either at its last chunk or at the last one with ``dout`` chunks ahead.
        (A chunk's all-to-all result is taken to be a copy: ``batch * heads per rank > 1``.)

        On CUDA the same tensors are allocated: a prefetch allocates its device chunk on the side stream where
        CPU clones the host copy, and the ring's send copies are made on that stream too. What CUDA adds is
        ``record_stream``: a chunk dropped while its offload copy (or a kernel of another stream) still reads
        it is not handed out again until that work is done. That holds back reserved memory, not allocated
        bytes (the caching allocator counts a block as freed when the code drops it, which is what
        ``torch.cuda.max_memory_allocated`` and the planner count), so it adds nothing here.
        """
        u = 1 if self.ulysses > 1 else 0
        n = self.chunks
        if offload:
            forward = [Buffers(q=3 + 7 * u, acc_q=4, kv=6 + 4 * u, acc_kv=0, lse=4)]
            backward = [Buffers(q=8 + 7 * u, acc_q=2, kv=10, acc_kv=8, lse=3)]
        else:
            forward = [Buffers(q=4 * u, acc_q=4, kv=2 * u, acc_kv=0, lse=2 - u, per_chunk_q=1 + u,
                               per_chunk_kv=2 * u, per_chunk_lse=1)]
            # kept from the forward: every chunk's out, lse (and with Ulysses its q and K/V)
            kept = dict(per_chunk_q=1 + u, per_chunk_kv=2 * u, per_chunk_lse=1)
            backward = [Buffers(q=2 + 3 * u, acc_q=2, kv=4, acc_kv=0, lse=0, per_chunk_acc_kv=2, **kept)]
            if u and n >= 3:  # chunk n - 3, the last with two dout chunks ahead: 2 (n - 3) stored sums, a new one
                backward.append(Buffers(q=2 + 7 * u, acc_q=2, kv=4, acc_kv=-4, lse=0, per_chunk_acc_kv=2, **kept))
        if self.ring > 1:  # received rows and sent copies of two K/V steps per peer, a block's output per peer
            forward = [m._replace(kv_per_peer=2 * (2 + 2), q_per_peer=1) for m in forward]
            backward = [m._replace(kv_per_peer=2 * (2 + 2), acc_kv_per_peer=2 * (2 + 2), q_per_peer=1)
                        for m in backward]
        return WorkingSet(tuple(forward)), WorkingSet(tuple(backward))


#: With offload the working set is the same for every chunk count from this one (fewer chunks use the stores'
#: resident chunks more often, and hold less).
OFFLOAD_STEADY_CHUNKS = 6


__all__ = ["OFFLOAD_STEADY_CHUNKS", "Buffers", "ChunkGeometry", "ChunkSchedule", "RingTransfer", "WorkingSet"]
