"""The load-balanced sequence layout (zigzag) and the autograd-aware shard / unshard between it and a full sequence.

A causal mask makes late tokens cost more than early ones. The global sequence of ``S`` tokens is cut into
``2R`` equal chunks; ring position ``r`` holds chunks ``r`` and ``2R-1-r`` (one cheap, one expensive), so
every ring step does the same work. Inside a ring position, the two chunks, concatenated in that order,
are split into ``U`` contiguous pieces, one per Ulysses rank: the Ulysses all-to-all then gathers exactly
``[chunk r ; chunk 2R-1-r]`` in increasing position order. With ``R = 1`` the layout is the plain
contiguous split.

FPDT chunking (``chunk_size = C``) cuts that group sequence of ``L = S / R`` tokens into ``L / C`` chunks
and gives each Ulysses rank a ``C / U`` slice of every chunk (rank ``u`` holds ``G[i*C + u*C/U :
i*C + (u+1)*C/U]`` for every ``i``, in order of ``i``), so that the all-to-all of local rows
``[i*C/U, (i+1)*C/U)`` gathers exactly chunk ``i`` of the group sequence. ``C = L`` is the layout above.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .topology import Topology

EVERY = slice(None)


def ring_source(ring_rank: int, step: int, ring: int) -> int:
    """The ring rank whose K/V reaches ``ring_rank`` at ring ``step`` (blocks travel to the next rank)."""
    return (ring_rank - step) % ring


def ring_dest(ring_rank: int, step: int, ring: int) -> int:
    """The ring rank that ``ring_rank``'s K/V reaches at ring ``step``."""
    return (ring_rank + step) % ring


class RingBlock(NamedTuple):
    """What one rank pair computes: query rows ``q`` against key rows ``kv`` (slices of the two group
    sequences), with the causal diagonal (``causal``, same rows on both sides) or fully visible."""

    q: slice
    kv: slice
    causal: bool


class LayoutError(ValueError):
    """A sequence length the layout cannot split; raised identically on every rank."""


class ZigzagLayout:
    """Zigzag load balancer for ``ring`` positions of ``ulysses`` ranks each, optionally chunked for FPDT
    (``chunk_size`` tokens of the group sequence per chunk; None: one chunk)."""

    def __init__(self, ring: int, ulysses: int, chunk_size: Optional[int] = None):
        self.ring = ring
        self.ulysses = ulysses
        self.chunk_size = chunk_size

    @classmethod
    def of(cls, topo: "Topology", chunk_size: Optional[int] = None) -> "ZigzagLayout":
        return cls(topo.ring, topo.ulysses, chunk_size)

    @property
    def multiple(self) -> int:
        """The global sequence length must be a multiple of this."""
        R, U = self.ring, self.ulysses
        if R == 1:
            return U
        return math.lcm(2 * R, R * U)

    def check(self, seq_len: int, what: str = "sequence length") -> None:
        m = self.multiple
        if seq_len % m != 0:
            raise LayoutError(
                f"{what} {seq_len} is not divisible by {m}, which ring={self.ring} x ulysses={self.ulysses} "
                f"needs (2*ring chunks, each ring position split over the ulysses ranks); pad the sequence "
                f"to {((seq_len + m - 1) // m) * m} or change the degrees")
        C = self.chunk_size
        if C is None:
            return
        L = seq_len // self.ring
        if isinstance(C, bool) or not isinstance(C, int) or C < 1:
            raise LayoutError(f"chunk_size must be a positive integer, got {C!r}")
        if C % self.ulysses != 0:
            raise LayoutError(
                f"chunk_size {C} is not divisible by ulysses={self.ulysses}: every chunk is split evenly over "
                f"the ulysses ranks; use a multiple of {self.ulysses}")
        if L % C != 0:
            raise LayoutError(
                f"chunk_size {C} does not divide the {L} tokens of each ring position ({what} {seq_len} / "
                f"ring {self.ring}); use a divisor of {L} that is a multiple of {self.ulysses}")

    def local_len(self, seq_len: int) -> int:
        return seq_len // (self.ring * self.ulysses)

    def local_positions(self, seq_len: int, ring_rank: int, ulysses_rank: int,
                        device=None) -> torch.Tensor:
        """Global token positions held by ``(ring_rank, ulysses_rank)``, in local order. Shape ``[S_local]``."""
        self.check(seq_len)
        R, U = self.ring, self.ulysses
        if R == 1:
            group = torch.arange(seq_len, device=device)
        else:
            c = seq_len // (2 * R)
            group = torch.cat([torch.arange(ring_rank * c, (ring_rank + 1) * c, device=device),
                               torch.arange((2 * R - 1 - ring_rank) * c, (2 * R - ring_rank) * c, device=device)])
        C = self.chunk_size or group.numel()
        # [chunk, ulysses rank, C/U]: rank u holds its slice of every chunk, chunk by chunk.
        return group.view(group.numel() // C, U, C // U)[:, ulysses_rank].reshape(-1)

    def gather_order(self, seq_len: int, device=None) -> torch.Tensor:
        """Positions of all sequence-parallel ranks' tokens concatenated in ``sp_rank`` order. Shape ``[S]``."""
        return torch.cat([self.local_positions(seq_len, r, u, device)
                          for r in range(self.ring) for u in range(self.ulysses)])

    def group_runs(self, seq_len: int, ring_rank: int) -> tuple:
        """Global positions of ring position ``ring_rank``'s group sequence (what the Ulysses all-to-all gathers,
        chunking aside) as runs ``((first position, length), ...)`` in row order."""
        R = self.ring
        if R == 1:
            return ((0, seq_len),)
        c = seq_len // (2 * R)
        return ((ring_rank * c, c), ((2 * R - 1 - ring_rank) * c, c))

    def visible(self, q_rank: int, kv_rank: int, causal: bool, group_len: int) -> Optional[RingBlock]:
        """The part of ring rank ``kv_rank``'s group sequence (``group_len`` tokens, ``[chunk k ; chunk 2R-1-k]``)
        that the queries of ``q_rank``'s group sequence see, or None if nothing: the one place the zigzag
        visibility rule is written (the ring schedule and FPDT's chunk schedule both read it; another load
        balancer is another class with this method, :meth:`local_positions` and :meth:`group_runs`).

        A rank's own block is the causal diagonal. For ``kv_rank < q_rank`` every query sees only the first
        (early) chunk of ``kv_rank`` fully; for ``kv_rank > q_rank`` only the late query chunk sees both chunks
        of ``kv_rank``. Either way a remote block costs two chunk-pairs, the same on every rank.
        """
        if not causal:
            return RingBlock(EVERY, EVERY, False)
        if q_rank == kv_rank:
            return RingBlock(EVERY, EVERY, True)
        half = group_len // 2
        if kv_rank < q_rank:
            return RingBlock(EVERY, slice(0, half), False)
        return RingBlock(slice(half, None), EVERY, False)

    def ring_block(self, step: int, ring_rank: int, causal: bool, group_len: int) -> RingBlock:
        """The block of ring ``step`` on ``ring_rank``, which holds the K/V of ring rank
        :func:`ring_source` ``(ring_rank, step)`` (:meth:`visible`; step 0 is the local causal block)."""
        return self.visible(ring_rank, ring_source(ring_rank, step, self.ring), causal, group_len)

def positions(seq_len: int, topo: "Topology", device=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Global positions (e.g. for RoPE) of this rank's ``S_local`` tokens in the layout (chunked for FPDT
    when ``chunk_size`` is given). Shape ``[S_local]``."""
    return ZigzagLayout.of(topo, chunk_size).local_positions(seq_len, topo.ring_rank, topo.ulysses_rank, device)


def _all_gather_seq(x: torch.Tensor, topo: "Topology", dim: int) -> torch.Tensor:
    """Concatenate the sequence-parallel ranks' ``x`` along ``dim`` in ``sp_rank`` order."""
    if topo.sp == 1:
        return x
    import torch.distributed as dist  # here, not at import: the layout's rules need no process group

    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((topo.sp * moved.shape[0],) + moved.shape[1:], dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, moved, group=topo.sp_group)
    return out.movedim(0, dim)


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topo, dim, chunk_size):
        ctx.topo, ctx.dim, ctx.chunk_size = topo, dim, chunk_size
        idx = positions(x.shape[dim], topo, device=x.device, chunk_size=chunk_size)
        return x.index_select(dim, idx)

    @staticmethod
    def backward(ctx, grad):
        return _unshard_impl(grad, ctx.topo, ctx.dim, ctx.chunk_size), None, None, None


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topo, dim, chunk_size):
        ctx.topo, ctx.dim, ctx.chunk_size = topo, dim, chunk_size
        return _unshard_impl(x, topo, dim, chunk_size)

    @staticmethod
    def backward(ctx, grad):
        topo, dim = ctx.topo, ctx.dim
        idx = positions(grad.shape[dim], topo, device=grad.device, chunk_size=ctx.chunk_size)
        return grad.index_select(dim, idx), None, None, None


def _unshard_impl(x, topo, dim, chunk_size=None):
    gathered = _all_gather_seq(x, topo, dim)
    seq_len = gathered.shape[dim]
    order = ZigzagLayout.of(topo, chunk_size).gather_order(seq_len, device=x.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq_len, device=x.device)
    return gathered.index_select(dim, inverse)


def shard(x: torch.Tensor, topo: "Topology", dim: int = 1, chunk_size: Optional[int] = None) -> torch.Tensor:
    """This rank's part of the full sequence ``x`` in the zigzag layout (chunked for FPDT with ``chunk_size``,
    the layout :func:`ds_longctx.attention.attention` expects for that ``chunk_size``).

    ``x``: ``[..., S, ...]`` with the sequence at ``dim``, identical on every rank of the sequence-parallel
    group; returns ``[..., S / (U*R), ...]``. Autograd: the gradient of ``x`` is gathered from all
    sequence-parallel ranks, so every rank holds the full gradient of the replicated input.
    """
    dim = dim % x.dim()
    ZigzagLayout.of(topo, chunk_size).check(x.shape[dim])
    return _Shard.apply(x, topo, dim, chunk_size)


def unshard(x: torch.Tensor, topo: "Topology", dim: int = 1, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`shard` (same ``chunk_size``): gathers the full sequence ``[..., S, ...]`` on every
    rank (collective).

    Autograd: the consumer of the full tensor is taken to be replicated on the sequence-parallel ranks
    (each computes the same function of it), so a shard's gradient is its slice of the full gradient.
    """
    dim = dim % x.dim()
    if chunk_size is not None:
        ZigzagLayout.of(topo, chunk_size).check(x.shape[dim] * topo.sp)
    return _Unshard.apply(x, topo, dim, chunk_size)

