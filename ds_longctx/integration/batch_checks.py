"""Checks of a batch's values, and of the ranks of a sequence-parallel group holding the same batch.

A token id outside the vocabulary fails inside the embedding's kernel (a device assert that takes the
process down on a GPU) after other ranks have entered collectives; position ids out of order give RoPE
positions the layout does not have; and ranks of one sequence-parallel group given different batches (a
sampler split over all ranks instead of the data-parallel ones) would train on a sequence that no rank
holds, or hang when the lengths differ. :func:`value_problem` reads one rank's batch (no collective);
:func:`agree_on_batch` makes every rank raise together, with one small all-reduce when all is well.
"""
from __future__ import annotations

from typing import Any, List, Mapping, NamedTuple, Optional, Type

import torch
import torch.distributed as dist

from ..topology import Topology
from .agree import _flag_device, raise_together

_CHECKSUM_MOD = 2 ** 31 - 1


class BatchFingerprint(NamedTuple):
    """What ranks of one sequence-parallel group must share: the batch's shape and a checksum of its tokens."""

    batch: int
    seq: int
    checksum: int


def fingerprint(batch: Mapping[str, Any]) -> BatchFingerprint:
    """``(B, S, checksum of input_ids)`` of a full batch (``inputs_embeds``: shape only)."""
    ids = batch.get("input_ids")
    ref = ids if ids is not None else batch["inputs_embeds"]
    checksum = 0
    if ids is not None:
        flat = ids.reshape(-1).long().cpu()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.long) % _CHECKSUM_MOD
        checksum = int(((flat % _CHECKSUM_MOD) * weights % _CHECKSUM_MOD).sum() % _CHECKSUM_MOD)
    return BatchFingerprint(int(ref.shape[0]), int(ref.shape[1]), checksum)


def _outside(t: torch.Tensor, vocab_size: int, ignore_index: Optional[int]) -> Optional[str]:
    bad = (t < 0) | (t >= vocab_size)
    if ignore_index is not None:
        bad &= t != ignore_index
    if not bool(bad.any()):
        return None
    where = bad.nonzero()[0].tolist()
    return f"{int(t[tuple(where)])} at [{', '.join(map(str, where))}] ({int(bad.sum())} such)"


def position_problem(position_ids: torch.Tensor) -> Optional[str]:
    """What is wrong with full-sequence ``position_ids`` ``[1 or B, S]``: they must count up by one within a
    row and may only restart at 0 (a new packed document); None when they do."""
    if position_ids.dtype.is_floating_point:
        return f"position_ids must be integers, got {position_ids.dtype}"
    if bool((position_ids < 0).any()):
        return f"position_ids hold negative values (min {int(position_ids.min())}); positions start at 0"
    jumps = (position_ids[:, 1:] != position_ids[:, :-1] + 1) & (position_ids[:, 1:] != 0)
    if bool(jumps.any()):
        row, col = jumps.nonzero()[0].tolist()
        return (f"position_ids jump from {int(position_ids[row, col])} to {int(position_ids[row, col + 1])} at "
                f"row {row}, index {col + 1}: within a row they count up by 1 and restart only at 0 (a new packed "
                f"document). Pass the positions of the full sequence in order; shard_batch puts them in the "
                f"layout (positions already zigzagged or sharded look like this)")
    return None


def value_problem(batch: Mapping[str, Any], vocab_size: Optional[int], ignore_index: int) -> Optional[str]:
    """Token ids and labels outside ``[0, vocab_size)`` (labels may be ``ignore_index``), position ids out of
    order; None when the values are fine. Reads only this rank's batch."""
    if vocab_size is not None:
        for key, ignore in (("input_ids", None), ("labels", ignore_index), ("shift_labels", ignore_index)):
            t = batch.get(key)
            if torch.is_tensor(t):
                found = _outside(t, vocab_size, ignore)
                if found is not None:
                    allowed = f" or {ignore}" if ignore is not None else ""
                    return (f"{key} holds ids outside the model's vocabulary [0, {vocab_size}){allowed}: {found}; "
                            f"check the tokenizer matches the model (vocab_size {vocab_size})")
    pos = batch.get("position_ids")
    return position_problem(pos) if torch.is_tensor(pos) else None


def agree_on_batch(problem: Optional[str], mine: Optional[BatchFingerprint], topo: Topology,
                   error: Type[Exception] = ValueError) -> None:
    """Collective over the world: raise ``error`` on every rank if any rank has a ``problem``, or if the ranks
    of a sequence-parallel group hold batches with different fingerprints. One all-reduce of ``1 + 6 * dp``
    integers when all is well (each group's fingerprint maxima and negated minima side by side)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise_together(problem, error)
        return
    slots = torch.full((1 + 6 * topo.dp,), -2 ** 62, dtype=torch.long)  # other groups' slots: below any value
    slots[0] = int(problem is not None)
    if mine is not None:
        at = 1 + 6 * topo.dp_rank
        slots[at:at + 3] = torch.tensor(mine)
        slots[at + 3:at + 6] = -torch.tensor(mine)
    slots = slots.to(_flag_device())
    dist.all_reduce(slots, op=dist.ReduceOp.MAX)
    slots = slots.cpu()
    if int(slots[0]):
        raise_together(problem, error)  # the failure path: shares the failing rank's message
        return
    groups = slots[1:].view(topo.dp, 2, 3)
    if bool((groups[:, 0] == -groups[:, 1]).all()):
        return
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    raise error(_describe_mismatch(everyone, topo))


def _describe_mismatch(everyone: List[Any], topo: Topology) -> str:
    sp = topo.sp
    for d in range(topo.dp):
        ranks = list(range(d * sp, (d + 1) * sp))
        held = [everyone[r] for r in ranks]
        other = next(r for r, fp in zip(ranks, held) if fp != held[0]) if any(fp != held[0] for fp in held) else None
        if other is None:
            continue
        a, b = held[0], everyone[other]
        what = (f"input_ids [{a.batch}, {a.seq}] on rank {ranks[0]} but [{b.batch}, {b.seq}] on rank {other}"
                if (a.batch, a.seq) != (b.batch, b.seq) else
                f"different tokens on rank {ranks[0]} and rank {other} (same shape [{a.batch}, {a.seq}])")
        return (f"the ranks of sequence-parallel group {ranks} hold different batches: {what}. Every rank of a "
                f"sequence-parallel group must get the same full batch: split the sampler over the data-parallel "
                f"ranks only (num_replicas=topology.dp, rank=topology.dp_rank), not over all ranks")
    return "the ranks of a sequence-parallel group hold different batches"


__all__ = ["BatchFingerprint", "agree_on_batch", "fingerprint", "position_problem", "value_problem"]
