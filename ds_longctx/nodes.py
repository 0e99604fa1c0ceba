"""Which node each rank runs on, and the rule that a Ulysses group stays inside one node.

A Ulysses all-to-all moves every activation of the attention each layer, forward and backward: inside a node
it runs over NVLink, across nodes over the network at a fraction of that bandwidth. Rings pass one K/V block
to one neighbour per step, overlapped with the kernel, so they are what should span nodes. Launchers put
consecutive ranks on one node, and :class:`~ds_longctx.topology.Topology` makes Ulysses groups of consecutive
ranks, so ``ulysses_degree`` must divide the ranks per node; :func:`cross_node_ulysses` says when it does not.

The node of a rank is read from the launcher's environment: torchrun's ``GROUP_RANK``, the DeepSpeed
launcher's ``CROSS_RANK``, SLURM's ``SLURM_NODEID``, together with the host name (so that launchers that set
none of them still separate real nodes, and two "nodes" launched on one machine stay apart).
"""
from __future__ import annotations

import os
import socket
from typing import List, Optional, Sequence

import torch.distributed as dist

#: Environment variables naming the node of this process, first set one wins (torchrun, DeepSpeed, SLURM).
NODE_ENV = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")
ALLOW_ENV = "DS_LONGCTX_ALLOW_CROSS_NODE_ULYSSES"


def this_node() -> str:
    """This process's node: ``host`` or ``host/<launcher's node index>``."""
    index = next((f"{name}={os.environ[name]}" for name in NODE_ENV if os.environ.get(name)), None)
    host = socket.gethostname()
    return f"{host}/{index}" if index else host


def gather_nodes() -> List[str]:
    """The node of every rank of the world, in rank order (collective over the world)."""
    nodes: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, this_node())
    return [str(n) for n in nodes]


def cross_node_ulysses(ulysses_groups: Sequence[Sequence[int]], nodes: Sequence[str]) -> Optional[str]:
    """What is wrong when a Ulysses group has ranks on more than one node (None when each stays on one).

    ``ulysses_groups``: the ranks of every Ulysses group; ``nodes``: the node of every rank."""
    for ranks in ulysses_groups:
        where = [nodes[r] for r in ranks]
        if len(set(where)) == 1:
            continue
        per_node = min(sum(1 for n in nodes if n == node) for node in set(nodes))
        U = len(ranks)
        spread = ", ".join(f"rank {r} on {n}" for r, n in zip(ranks, where))
        return (f"long_context.ulysses_degree={U}: Ulysses group {list(ranks)} spans nodes ({spread}); its "
                f"all-to-all would leave the node's NVLink. Nodes here hold {per_node} ranks: choose "
                f"ulysses_degree dividing {per_node} and raise ring_degree instead (rings span nodes), or set "
                f"{ALLOW_ENV}=1 to run it anyway (warned)")
    return None


def allowed_by_env() -> bool:
    """Whether the user insists on Ulysses groups across nodes (``DS_LONGCTX_ALLOW_CROSS_NODE_ULYSSES=1``)."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


__all__ = ["ALLOW_ENV", "NODE_ENV", "allowed_by_env", "cross_node_ulysses", "gather_nodes", "this_node"]
