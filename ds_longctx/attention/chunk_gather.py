"""The forward all-to-alls of FPDT chunked attention, posted ahead of use.

Each K/V chunk is gathered just before the first query chunk that needs it and stored as it arrives;
each query chunk (and on a stash replay its kept output) is gathered in turn; :class:`Ahead` keeps two
jobs in flight beyond the one in use, so the all-to-alls run beside the attention.
"""
from __future__ import annotations

from functools import partial
from typing import List, NamedTuple, Optional, Sequence

from ..comm.all_to_all import seq_to_heads_start
from ..geometry import ChunkSchedule
from ..memory.chunk_store import ChunkStore
from ..memory.attention_stash import StashedCall
from .chunk_plan import ChunkPlan, KVChunk


class QueryGather(NamedTuple):
    """A query chunk's all-to-alls in flight: ``q``, and on a replay the kept output (else None)."""

    q: object
    out: Optional[object]


class Ahead:
    """Posts a list of all-to-alls in order, ``depth`` ahead of the one being consumed."""

    def __init__(self, posts: Sequence, depth: int = 2):
        self.posts, self.depth, self.pending, self.next = list(posts), depth, {}, 0

    def take(self, t: int):
        while self.next < len(self.posts) and self.next <= t + self.depth:
            self.pending[self.next] = self.posts[self.next]()
            self.next += 1
        return self.pending.pop(t)


class _Gather(NamedTuple):
    """One forward all-to-all: K/V chunk ``chunk`` (``kv``) or query chunk ``chunk``."""

    kv: bool
    chunk: int


def _gather_order(schedule: ChunkSchedule) -> List[_Gather]:
    """All-to-alls in the order the forward consumes them: each K/V chunk just before the first query chunk
    that needs it (its own diagonal, or a ring peer's visible rows), then that query chunk."""
    order, have = [], 0
    for i in range(schedule.chunks):
        need = schedule.kv_steps(i)
        order += [_Gather(True, j) for j in range(have, need)]
        have = max(have, need)
        order.append(_Gather(False, i))
    return order


def _post_gather(plan: ChunkPlan, kept: Optional[StashedCall], job: _Gather, q, k, v):
    opts, topo, rows = plan.opts, plan.topo, plan.local_rows(job.chunk)
    group, rank = topo.ulysses_group, topo.ulysses_rank
    if job.kv:
        return KVChunk(seq_to_heads_start(k[:, rows], opts.kv_ranges, group, rank),
                       seq_to_heads_start(v[:, rows], opts.kv_ranges, group, rank))
    return QueryGather(seq_to_heads_start(q[:, rows], opts.q_ranges, group, rank),
                       None if kept is None else seq_to_heads_start(kept.out[:, rows], opts.q_ranges, group, rank))


class Gathers:
    """The forward's all-to-alls (K/V chunks stored as they arrive; a replay also gathers the kept output)."""

    def __init__(self, plan: ChunkPlan, q, k, v, kept: Optional[StashedCall]):
        self.order = _gather_order(plan.schedule)
        # The posts reference the plan and inputs, never this object: no cycle keeps the kept output (and
        # its host buffer) alive past the call until the garbage collector runs.
        self.ahead = Ahead([partial(_post_gather, plan, kept, job, q, k, v) for job in self.order])
        self.next = 0

    def query_chunk(self, kv: ChunkStore) -> QueryGather:
        """The next query chunk's pending gathers, after storing the K/V chunks that come before it."""
        while self.order[self.next].kv:
            kv.put(self.order[self.next].chunk, [w.wait() for w in self.ahead.take(self.next)])
            self.next += 1
        pending = self.ahead.take(self.next)
        self.next += 1
        return pending


__all__ = ["Ahead", "Gathers", "QueryGather"]
