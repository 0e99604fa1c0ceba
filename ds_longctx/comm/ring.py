"""Async point-to-point exchange around a ring group: send to the next rank, receive from the previous.

Each call posts every send and receive of one step at once (``batch_isend_irecv``) into fresh buffers and
returns without waiting, so the transfer of the next block overlaps the computation on the current one
(double buffering: the current and the incoming block are both alive until ``wait``).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist


class RingComm:
    """Send/receive around the ring of a :class:`~ds_longctx.topology.Topology`."""

    def __init__(self, topo):
        self.size = topo.ring
        self.rank = topo.ring_rank
        self.next = topo.ring_next
        self.prev = topo.ring_prev
        self.group = topo.ring_group

    def exchange(self, tensors: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], list]:
        """Post sends of ``tensors`` to the next rank and receives of same-shaped ones from the previous.

        Returns ``(received, pending)``; the received buffers are valid after :meth:`wait` on ``pending``,
        and the sent tensors must not be modified before it.
        """
        ops, received, sent = [], [], []
        for t in tensors:
            t = t.contiguous()
            buf = torch.empty_like(t)
            sent.append(t)
            received.append(buf)
            ops.append(dist.P2POp(dist.isend, t, self.next, self.group))
            ops.append(dist.P2POp(dist.irecv, buf, self.prev, self.group))
        # The sent tensors ride along so that a contiguous copy outlives its transfer.
        return received, (dist.batch_isend_irecv(ops), sent)

    @staticmethod
    def wait(pending) -> None:
        for req in pending[0]:
            req.wait()
