"""Ulysses all-to-all: scatter heads / gather the sequence inside a Ulysses group, and back.

Rank ``u`` of the group receives the heads ``ranges[u] = (start, end)`` of every rank's sequence piece.
Ranges may be uneven (heads not divisible by the degree) and, for K/V, may overlap (a kv head needed by
the query heads of two ranks is sent to both: that is how kv heads fewer than the degree are replicated).
K/V always travel with their own ``Hkv`` heads, never expanded to the query heads.
The two directions are each other's adjoint; where ranges overlap the adjoint sums the replicas' grads.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

Ranges = Sequence[Tuple[int, int]]


def _is_cover(ranges: Ranges, n_heads: int) -> bool:
    """Whether ranges tile ``[0, n_heads)`` in order without overlap (no gather/scatter-add needed)."""
    pos = 0
    for a, b in ranges:
        if a != pos:
            return False
        pos = b
    return pos == n_heads


class Pending:
    """An all-to-all in flight: ``wait()`` returns its result once the transfer is done."""

    def __init__(self, work, finish):
        self._work, self._finish = work, finish

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        return self._finish()


def seq_to_heads_start(x: torch.Tensor, ranges: Ranges, group, rank: int) -> Pending:
    """Post the all-to-all of :func:`seq_to_heads` without waiting (NCCL runs it beside compute)."""
    B, s, Hx, D = x.shape
    U = len(ranges)
    if U == 1:
        a, b = ranges[0]
        return Pending(None, lambda: x[:, :, a:b])
    xt = x.permute(2, 0, 1, 3)  # heads first: all_to_all_single splits dim 0
    send = xt.contiguous() if _is_cover(ranges, Hx) else torch.cat([xt[a:b] for a, b in ranges])
    n_me = ranges[rank][1] - ranges[rank][0]
    recv = torch.empty((U * n_me, B, s, D), dtype=x.dtype, device=x.device)
    work = dist.all_to_all_single(recv, send, output_split_sizes=[n_me] * U,
                                  input_split_sizes=[b - a for a, b in ranges], group=group, async_op=True)

    def finish():
        del_send = send  # noqa: F841 - the send buffer must outlive the transfer
        # [U(source = sequence piece), n_me, B, s, D] -> [B, U*s, n_me, D]
        return recv.view(U, n_me, B, s, D).permute(2, 0, 3, 1, 4).reshape(B, U * s, n_me, D)

    return Pending(work, finish)


def heads_to_seq_start(y: torch.Tensor, ranges: Ranges, group, rank: int, n_heads: int,
                       into: torch.Tensor = None, accumulate: bool = False) -> Pending:
    """Post the all-to-all of :func:`heads_to_seq` without waiting.

    With ``into`` (``[B, s, n_heads, D]``), the received heads are written into it at their head positions
    (ranges need not tile the heads: a head chunk); ``accumulate`` adds instead, for replicated kv heads
    whose gradients sum. Slices per source rank, not ``index_add``: no atomics on half-precision data.
    """
    B, S, n_me, D = y.shape
    U = len(ranges)
    if U == 1 and into is None:
        return Pending(None, lambda: y)
    s = S // U
    sizes = [b - a for a, b in ranges]
    if U == 1:
        recv, work = y.permute(2, 0, 1, 3), None
    else:
        send = y.reshape(B, U, s, n_me, D).permute(1, 3, 0, 2, 4).contiguous().view(U * n_me, B, s, D)
        recv = torch.empty((sum(sizes), B, s, D), dtype=y.dtype, device=y.device)
        work = dist.all_to_all_single(recv, send, output_split_sizes=sizes, input_split_sizes=[n_me] * U,
                                      group=group, async_op=True)

    def finish():
        if U > 1:
            del_send = send  # noqa: F841 - the send buffer must outlive the transfer
        target = into
        if target is None:
            if _is_cover(ranges, n_heads):
                return recv.permute(1, 2, 0, 3).contiguous()
            target = torch.zeros((B, s, n_heads, D), dtype=y.dtype, device=y.device)
        add = accumulate or into is None
        off = 0
        for a, b in ranges:
            part = recv[off:off + b - a].permute(1, 2, 0, 3)
            if add:
                target[:, :, a:b] += part
            else:
                target[:, :, a:b].copy_(part)
            off += b - a
        return target

    return Pending(work, finish)


def _seq_to_heads(x, ranges, group, rank):
    return seq_to_heads_start(x, ranges, group, rank).wait()


def _heads_to_seq(y, ranges, group, rank, n_heads):
    return heads_to_seq_start(y, ranges, group, rank, n_heads).wait()


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ranges, group, rank):
        ctx.args = (ranges, group, rank, x.shape[2])
        return _seq_to_heads(x, ranges, group, rank)

    @staticmethod
    def backward(ctx, grad):
        ranges, group, rank, n_heads = ctx.args
        return _heads_to_seq(grad.contiguous(), ranges, group, rank, n_heads), None, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, ranges, group, rank, n_heads):
        ctx.args = (ranges, group, rank)
        return _heads_to_seq(y.contiguous(), ranges, group, rank, n_heads)

    @staticmethod
    def backward(ctx, grad):
        ranges, group, rank = ctx.args
        return _seq_to_heads(grad, ranges, group, rank), None, None, None, None


def seq_to_heads(x: torch.Tensor, ranges: Ranges, group, rank: int) -> torch.Tensor:
    """``[B, s, Hx, D]`` (a sequence piece, all heads) -> ``[B, U*s, n, D]`` (the group's sequence, heads
    ``ranges[rank]``). Identity when the group has one rank."""
    if len(ranges) == 1:
        return x
    return _SeqToHeads.apply(x, list(ranges), group, rank)


def heads_to_seq(y: torch.Tensor, ranges: Ranges, group, rank: int, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads` for a disjoint cover of heads: ``[B, U*s, n, D] -> [B, s, n_heads, D]``."""
    if len(ranges) == 1:
        return y
    return _HeadsToSeq.apply(y, list(ranges), group, rank, n_heads)


def split_heads(n_heads: int, degree: int) -> List[Tuple[int, int]]:
    """Contiguous head ranges per rank, sizes differing by at most one (the first ranks take the extra)."""
    base, extra = divmod(n_heads, degree)
    out, pos = [], 0
    for u in range(degree):
        n = base + (1 if u < extra else 0)
        out.append((pos, pos + n))
        pos += n
    return out
