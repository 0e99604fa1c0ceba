"""Process topology: data parallel x ring x Ulysses.

Rank layout (global rank -> coordinates), innermost first::

    rank = dp_rank * (R * U) + ring_rank * U + ulysses_rank

Ulysses groups are ``U`` consecutive ranks so that their all-to-all stays on a node's NVLink; rings span
the Ulysses groups of one sequence-parallel group (``U * R`` consecutive ranks); data-parallel groups
join the ranks that hold the same coordinates in different sequence-parallel groups.

The groups live in this object, which is passed around explicitly; nothing is stored in module globals.
"""
from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.distributed as dist

from .nodes import allowed_by_env, cross_node_ulysses, gather_nodes


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
        timeout_s: seconds a collective on these groups may wait for a peer before it raises (gloo) or the
            NCCL watchdog aborts the process; ``None``: PyTorch's default (``long_context.timeout_s``).
        allow_cross_node_ulysses: a Ulysses group whose ranks sit on different nodes (its all-to-all would
            leave NVLink) raises :class:`TopologyError` unless this is true, when it warns. ``None``: true
            when the environment sets ``DS_LONGCTX_ALLOW_CROSS_NODE_ULYSSES=1``. See :mod:`ds_longctx.nodes`.

    ``torch.distributed`` must be initialized with a world size divisible by ``U * R`` (the data-parallel
    degree is the quotient). Without an initialized process group only ``U = R = 1`` is accepted and the
    topology is that of a single process. Constructing a ``Topology`` is collective: every rank must
    construct the same one, in the same order as its other ``new_group`` calls.
    """

    ulysses: int = 1
    ring: int = 1
    timeout_s: Optional[float] = None
    allow_cross_node_ulysses: Optional[bool] = None
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
    # The groups sit behind properties so that a destroyed topology cannot pass ``None`` (the world) to a
    # collective: that would run on every rank instead of failing.
    _groups: Optional[Dict[str, Optional[object]]] = field(init=False, repr=False)

    def __post_init__(self):
        U = _check_degree("ulysses", self.ulysses)
        R = _check_degree("ring", self.ring)
        if self.timeout_s is not None and (isinstance(self.timeout_s, bool) or not self.timeout_s > 0):
            raise TopologyError(f"timeout_s must be a positive number of seconds or None, got {self.timeout_s!r}")
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

        # Every rank must call new_group for every group in the same order, members or not.
        all_groups = {
            "ulysses": [[d * sp + r * U + u for u in range(U)] for d in range(dp) for r in range(R)],
            "ring": [[d * sp + r * U + u for r in range(R)] for d in range(dp) for u in range(U)],
            "sp": [[d * sp + i for i in range(sp)] for d in range(dp)],
            "dp": [[d * sp + i for d in range(dp)] for i in range(sp)],
        }
        timeout = None if self.timeout_s is None else datetime.timedelta(seconds=self.timeout_s)
        if initialized and world > 1 and U > 1:
            problem = cross_node_ulysses(all_groups["ulysses"], gather_nodes())  # the same on every rank
            allowed = allowed_by_env() if self.allow_cross_node_ulysses is None else self.allow_cross_node_ulysses
            if problem is not None and not allowed:
                raise TopologyError(problem)
            if problem is not None:
                warnings.warn(problem)
        groups = {"ulysses": None, "ring": None, "sp": None, "dp": None}
        mine = {}
        for name, lists in all_groups.items():
            for ranks in lists:
                group = dist.new_group(ranks, timeout=timeout) if initialized and world > 1 else None
                if rank in ranks:
                    mine[name] = ranks
                    groups[name] = group
        set_("ulysses_ranks", mine["ulysses"])
        set_("ring_ranks", mine["ring"])
        set_("sp_ranks", mine["sp"])
        set_("dp_ranks", mine["dp"])
        set_("_groups", groups)

    def _group(self, name: str):
        if self._groups is None:
            raise TopologyError(f"this Topology was destroyed (Topology.destroy); its {name} group is gone: "
                                f"build a new Topology(ulysses={self.ulysses}, ring={self.ring})")
        return self._groups[name]

    @property
    def ulysses_group(self):
        """This rank's Ulysses group (``None`` in a single process)."""
        return self._group("ulysses")

    @property
    def ring_group(self):
        """This rank's ring group (``None`` in a single process)."""
        return self._group("ring")

    @property
    def sp_group(self):
        """This rank's sequence-parallel group, ``U * R`` ranks (``None`` in a single process)."""
        return self._group("sp")

    @property
    def dp_group(self):
        """The ranks holding this rank's coordinates in the other replicas (``None`` in a single process)."""
        return self._group("dp")

    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` has released the groups."""
        return self._groups is None

    def destroy(self) -> None:
        """Release this topology's process groups.

        Every ``Topology`` owns ``new_group`` process groups, and a group lives (its connections and its
        backend's threads) until it is destroyed; a process that builds topologies or engines over and over
        (sweeps, tests) would otherwise slow every collective down with each one it leaves behind. Call on
        every rank, after the last collective on these groups; using the topology afterwards raises
        :class:`TopologyError`. A second call does nothing.
        """
        if self._groups is None:
            return
        groups, seen = self._groups, set()
        object.__setattr__(self, "_groups", None)
        if not dist.is_initialized():
            return  # destroying the world already shut every group down
        for group in groups.values():
            if group is None or id(group) in seen or group is dist.GroupMember.WORLD:
                continue
            seen.add(id(group))
            dist.destroy_process_group(group)

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

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
