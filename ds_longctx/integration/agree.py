"""Raise on every rank when any rank found a problem in its own data, so that none waits in a collective.

A config file or a batch is read per rank: one rank may find a problem the others do not. If only that
rank raised, the others would block in the next collective until its timeout. :func:`raise_together`
shares a per-rank problem (one all-reduce of one integer when all is well); :func:`agree_on_block`
also checks that every rank read the same configuration.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
import torch.distributed as dist

from ..config import BLOCK_KEY, LongContextConfigError


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _group_ranks(group, n: int) -> List[int]:
    return dist.get_process_group_ranks(group) if group is not None else list(range(n))


def _raise_first(mine: Optional[BaseException], problems: List[Optional[str]], ranks: List[int],
                 error: Type[Exception], what: str) -> None:
    """Raise when any rank has a problem: a failing rank its own exception, the others the first rank's."""
    failed = [(r, p) for r, p in zip(ranks, problems) if p is not None]
    if not failed:
        return
    if mine is not None:
        raise mine
    rank, message = failed[0]
    more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
    raise error(f"rank {rank}{more}{what}: {message}")


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
    mine = None if problem is None else error(problem)
    if not _distributed(group):
        if mine is not None:
            raise mine
        return
    flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32, device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if int(flag.item()) == 0:
        return
    problems: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)
    _raise_first(mine, problems, _group_ranks(group, len(problems)), error, "")


def agree_on_block(outcome: Union[Dict[str, Any], BaseException], group=None, what: str = BLOCK_KEY) -> None:
    """Make every rank raise the same error when any rank failed to read its block or the blocks differ.

    ``outcome`` is this rank's parsed block (any picklable dict, e.g. ``cfg.model_dump()`` plus the model's
    head counts) or the exception it raised reading it. Every rank of ``group`` must call this, including
    those whose own reading failed, so that no rank is left waiting in a collective.
    """
    mine = outcome if isinstance(outcome, BaseException) else None
    if not _distributed(group):
        if mine is not None:
            raise mine
        return
    entry = (f"{type(mine).__name__}: {mine}", None) if mine is not None else (None, outcome)
    gathered: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, entry, group=group)  # one collective: errors and blocks together
    ranks = _group_ranks(group, len(gathered))
    _raise_first(mine, [g[0] for g in gathered], ranks, LongContextConfigError, f" could not read its {what}")
    blocks = [g[1] for g in gathered]
    differing = [r for r, b in zip(ranks, blocks) if b != blocks[0]]
    if differing:
        diff = _describe_diff(blocks[0], blocks[ranks.index(differing[0])])
        raise LongContextConfigError(
            f"ranks disagree on the {what}: rank {ranks[0]} has {diff[0]} but rank(s) {differing} "
            f"have {diff[1]}; give every rank the same DeepSpeed config")


def agree_on_length(length: Optional[int], what: str, fix: str) -> int:
    """Collective over the world (one all-gather of one integer): the sequence length every rank holds.

    ``length``: this rank's, or None when its batch shows none. Raises :class:`LongContextConfigError` on
    every rank alike, naming the ranks' lengths and ``fix``, when they differ or a rank has none."""
    if not _distributed(None):
        if length is None:
            raise LongContextConfigError(f"{what}: the batch has no [batch, seq] input_ids or inputs_embeds; {fix}")
        return length
    mine = torch.tensor([-1 if length is None else int(length)], dtype=torch.int64, device=_flag_device())
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    lengths = [int(t.item()) for t in gathered]
    if len(set(lengths)) == 1 and lengths[0] >= 0:
        return lengths[0]
    missing = [r for r, n in enumerate(lengths) if n < 0]
    if missing:
        raise LongContextConfigError(f"{what}: rank(s) {missing} hold no [batch, seq] input_ids or inputs_embeds; "
                                     f"{fix}")
    shown = ", ".join(f"rank {r}: {n}" for r, n in enumerate(lengths))
    raise LongContextConfigError(f"{what}: the ranks' sequence lengths differ ({shown}); {fix}")


def _describe_diff(a: Any, b: Any, path: str = "") -> Tuple[str, str]:
    """The first differing leaf of two nested dicts, as ``path=value`` for each."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key, "<missing>") != b.get(key, "<missing>"):
                return _describe_diff(a.get(key, "<missing>"), b.get(key, "<missing>"),
                                      f"{path}.{key}" if path else str(key))
    prefix = f"{path}=" if path else ""
    return f"{prefix}{a!r}", f"{prefix}{b!r}"


__all__ = ["agree_on_block", "agree_on_length", "raise_together"]
