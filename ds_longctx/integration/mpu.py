"""The ``mpu`` object DeepSpeed takes for sequence parallelism, built on a :class:`~ds_longctx.topology.Topology`.

What DeepSpeed 0.19 reads from it, and why each answer is what it is (``deepspeed/utils/groups.py``,
``runtime/engine.py``, ``runtime/zero/stage3.py``, ``runtime/zero/parameter_offload.py``, ``runtime/config.py``):

* ``get_sequence_data_parallel_{group,world_size,rank}``: every rank. ZeRO partitions parameters, gradients
  and optimizer states over this group and reduces gradients over it, so memory is split over all
  ``dp x U x R`` ranks and every rank's gradient counts.
* ``initialize_sequence_parallel``: its presence is how DeepSpeed recognizes a sequence-parallel mpu (as its
  own ``parallel_state_sp``): it then reports model parallelism 1 and gives ZeRO no model-parallel group.
* ``get_data_parallel_{world_size,rank}``: the number of sequence replicas ``dp`` and this rank's replica, for
  the batch-size arithmetic (``train_batch_size = micro_batch * grad_acc * dp``) and DeepSpeed's dataloader
  sampler (the ranks of one sequence-parallel group read the same samples).
* No ``get_data_parallel_group``: ZeRO-3 would partition parameters over it (``parameter_offload``) while
  the optimizer partitions over all ranks; without it both use the world.
* No ``get_sequence_parallel_*``: when DeepSpeed 0.19.8 sees a sequence-parallel size ``sp > 1`` it divides
  reduced gradients by ``world / sp`` in some paths (stages 0-2, the ZeRO-3 contiguous-bucket path) but by
  ``world`` in the default ZeRO-3 reduce-scatter path, so the gradient scale would depend on the ZeRO
  settings. Without it every path averages over all ranks, and the loss (:mod:`.loss`) is built for that:
  every rank back-propagates the same replicated group loss, whose all-reduce has its true adjoint.
* ``get_model_parallel_{world_size,rank,group}``: 1, 0 and a group of this rank alone. Parameters are
  replicated over the sequence ranks, so no norm or overflow flag may be summed across them.
"""
from __future__ import annotations

import datetime
from typing import List, Optional

import torch.distributed as dist

from ..topology import Topology


class SequenceParallelMPU:
    """DeepSpeed ``mpu`` for ``dp x ring x ulysses`` (no tensor or pipeline parallelism)."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self._self_group = None

    def initialize_sequence_parallel(self, *args, **kwargs):
        """Marker DeepSpeed tests for with ``hasattr``; the groups already live in the Topology."""
        raise RuntimeError("the sequence-parallel groups are built by ds_longctx.Topology, not by the mpu")

    # sequence x data parallel: all ranks (ZeRO's partition and reduction group)
    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.topo.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.topo.rank

    # data parallel: sequence replicas (batch arithmetic, dataloader sampler); deliberately no group
    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self.topo.dp_ranks)

    # model parallel: none
    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self):
        """A group of this rank alone. Built on first use, by every rank for every rank in the same order,
        which is collective-safe because DeepSpeed asks for it on all ranks at the same point."""
        if self._self_group is None:
            mine: Optional[object] = None
            timeout = None if self.topo.timeout_s is None else datetime.timedelta(seconds=self.topo.timeout_s)
            for r in range(self.topo.world_size):
                g = dist.new_group([r], timeout=timeout)
                if r == self.topo.rank:
                    mine = g
            self._self_group = mine
        return self._self_group

    def destroy(self) -> None:
        """Release the model-parallel group if DeepSpeed asked for one (every rank; see ``Topology.destroy``)."""
        if self._self_group is not None:
            group, self._self_group = self._self_group, None
            if dist.is_initialized():  # else destroying the world already shut it down
                dist.destroy_process_group(group)

    def __repr__(self) -> str:
        t = self.topo
        return f"SequenceParallelMPU(dp={t.dp}, sp={t.sp} (ring={t.ring} x ulysses={t.ulysses}), rank={t.rank})"


__all__ = ["SequenceParallelMPU"]
