"""Raise on every rank when any rank found a problem in its own data, so that none waits in a collective.

A batch is read per rank: one data-parallel replica may get a bad batch while the others get good ones.
If only the bad ranks raised, the others would block in the next gradient reduction until the collective
timeout. :func:`raise_together` costs one all-reduce of one integer when all is well.
"""
from __future__ import annotations

from typing import List, Optional, Type

import torch
import torch.distributed as dist


def _flag_device() -> torch.device:
    """A device the default process group can reduce on (NCCL only takes accelerator tensors)."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    try:
        from deepspeed.accelerator import get_accelerator
        return torch.device(get_accelerator().current_device_name())
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return torch.device("cuda", torch.cuda.current_device())


def raise_together(problem: Optional[str], error: Type[Exception] = ValueError, group=None) -> None:
    """Collective over ``group`` (default: the world): raise ``error`` on every rank if any rank's
    ``problem`` is not ``None``. The message is the first failing rank's, with its rank.

    Every rank of ``group`` must call it, with ``problem=None`` when its own data is fine.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        if problem is not None:
            raise error(problem)
        return
    flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32, device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if int(flag.item()) == 0:
        return
    messages: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, problem, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(messages)))
    failed = [(r, m) for r, m in zip(ranks, messages) if m is not None]
    if problem is not None:
        raise error(problem)
    rank, message = failed[0]
    more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
    raise error(f"rank {rank}{more}: {message}")


__all__ = ["raise_together"]
