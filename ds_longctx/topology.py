"""Process topology: data parallel x ring x Ulysses.

Rank layout (global rank -> coordinates), innermost first::

    rank = dp_rank * (R * U) + ring_rank * U + ulysses_rank

Ulysses groups are ``U`` consecutive ranks so that their all-to-all stays on a node's NVLink; rings span
the Ulysses groups of one sequence-parallel group (``U * R`` consecutive ranks); data-parallel groups
join the ranks that hold the same coordinates in different sequence-parallel groups.

The groups live in this object, which is passed around explicitly; nothing is stored in module globals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch.distributed as dist


class TopologyError(ValueError):
    """A topology that cannot be built on this world; raised identically on every rank."""


def _check_degree(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TopologyError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class Topology:
    """Process groups and this rank's coordinates for ``dp x ring x ulysses`` parallelism.

    Args:
        ulysses: size ``U`` of each Ulysses (all-to-all, head-scatter) group.
        ring: size ``R`` of each ring (K/V rotation) group.

    ``torch.distributed`` must be initialized with a world size divisible by ``U * R`` (the data-parallel
    degree is the quotient). Without an initialized process group only ``U = R = 1`` is accepted and the
    topology is that of a single process. Constructing a ``Topology`` is collective: every rank must
    construct the same one, in the same order as its other ``new_group`` calls.
    """

    ulysses: int = 1
    ring: int = 1
    rank: int = field(init=False)
    world_size: int = field(init=False)
    dp: int = field(init=False)
    ulysses_rank: int = field(init=False)
    ring_rank: int = field(init=False)
    dp_rank: int = field(init=False)
    ulysses_ranks: List[int] = field(init=False)
    ring_ranks: List[int] = field(init=False)
    sp_ranks: List[int] = field(init=False)
    dp_ranks: List[int] = field(init=False)
    ulysses_group: Optional[object] = field(init=False, repr=False)
    ring_group: Optional[object] = field(init=False, repr=False)
    sp_group: Optional[object] = field(init=False, repr=False)
    dp_group: Optional[object] = field(init=False, repr=False)

    def __post_init__(self):
        U = _check_degree("ulysses", self.ulysses)
        R = _check_degree("ring", self.ring)
        initialized = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialized else 1
        rank = dist.get_rank() if initialized else 0
        if world % (U * R) != 0:
            raise TopologyError(
                f"world size {world} is not divisible by ulysses x ring = {U} x {R} = {U * R}; "
                f"choose degrees whose product divides {world}")
        dp = world // (U * R)
        sp = U * R
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("rank", rank)
        set_("world_size", world)
        set_("dp", dp)
        set_("dp_rank", rank // sp)
        set_("ring_rank", (rank % sp) // U)
        set_("ulysses_rank", rank % U)

        groups = {"ulysses": None, "ring": None, "sp": None, "dp": None}
        mine = {}
        # Every rank must call new_group for every group in the same order, members or not.
        all_groups = {
            "ulysses": [[d * sp + r * U + u for u in range(U)] for d in range(dp) for r in range(R)],
            "ring": [[d * sp + r * U + u for r in range(R)] for d in range(dp) for u in range(U)],
            "sp": [[d * sp + i for i in range(sp)] for d in range(dp)],
            "dp": [[d * sp + i for d in range(dp)] for i in range(sp)],
        }
        for name, lists in all_groups.items():
            for ranks in lists:
                group = dist.new_group(ranks) if initialized and world > 1 else None
                if rank in ranks:
                    mine[name] = ranks
                    groups[name] = group
        set_("ulysses_ranks", mine["ulysses"])
        set_("ring_ranks", mine["ring"])
        set_("sp_ranks", mine["sp"])
        set_("dp_ranks", mine["dp"])
        set_("ulysses_group", groups["ulysses"])
        set_("ring_group", groups["ring"])
        set_("sp_group", groups["sp"])
        set_("dp_group", groups["dp"])

    @property
    def sp(self) -> int:
        """Sequence-parallel degree ``U * R``."""
        return self.ulysses * self.ring

    @property
    def sp_rank(self) -> int:
        """Position in the sequence-parallel group (``ring_rank * U + ulysses_rank``)."""
        return self.ring_rank * self.ulysses + self.ulysses_rank

    @property
    def ring_next(self) -> int:
        """Global rank that receives this rank's K/V in the ring."""
        return self.ring_ranks[(self.ring_rank + 1) % self.ring]

    @property
    def ring_prev(self) -> int:
        """Global rank whose K/V this rank receives in the ring."""
        return self.ring_ranks[(self.ring_rank - 1) % self.ring]

    def __repr__(self) -> str:
        return (f"Topology(dp={self.dp}, ring={self.ring}, ulysses={self.ulysses}, rank={self.rank}: "
                f"dp_rank={self.dp_rank}, ring_rank={self.ring_rank}, ulysses_rank={self.ulysses_rank})")
