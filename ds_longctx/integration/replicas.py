"""accelerate's view of a sequence-parallel DeepSpeed world: process state, dataloaders and gathers by replica.

accelerate knows data parallelism over all processes. Under ds_longctx the ranks of a sequence-parallel
group (``U x R`` consecutive ranks) read the same samples, so samples are split over the ``dp`` replicas
only and what each rank reports (a loss, a token count) is the group's, present ``U x R`` times.

On CPU processes started by the ``deepspeed`` launcher accelerate 1.x reports a world of one process:
its DeepSpeed path sets the process state up only when it finds a GPU-like device, and its CPU path
(``use_cpu``) turns DeepSpeed off. :func:`repair_cpu_deepspeed_state` builds the state on the communication
backend DeepSpeed uses on that machine (``gloo`` on CPU), which is all that is missing.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, NamedTuple

import torch


class Replicas(NamedTuple):
    """Where this rank sits among the data-parallel replicas (``rank = dp_rank * sp + sp_rank``)."""

    sp: int       # ranks of one sequence-parallel group (U x R)
    dp: int       # replicas: world size / sp
    dp_rank: int  # this rank's replica

    @classmethod
    def of(cls, world_size: int, rank: int, sp: int) -> "Replicas":
        return cls(sp=sp, dp=world_size // sp, dp_rank=rank // sp)


def repair_cpu_deepspeed_state(args) -> bool:
    """Give ``TrainingArguments`` with a DeepSpeed config the real world on CPU processes. Returns whether the
    state was rebuilt (only where accelerate found no backend for a launched DeepSpeed process on a machine
    whose DeepSpeed accelerator is the CPU); elsewhere nothing changes."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = getattr(args, "distributed_state", None)
    if (not getattr(args, "deepspeed", None) or state is None or int(os.environ.get("LOCAL_RANK", -1)) == -1
            or state.distributed_type != DistributedType.DEEPSPEED or state.backend is not None):
        return False
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return False
    AcceleratorState._reset_state(reset_partial_state=True)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets around this call, too
    try:
        args.distributed_state = PartialState(backend=accelerator.communication_backend_name(),
                                              timeout=timedelta(seconds=args.ddp_timeout))
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    return True


def prepare_loader_over_replicas(accelerator, loader, replicas: Replicas):
    """``accelerator.prepare_data_loader(loader)`` with the samples split over the ``dp`` replicas: the ranks
    of a sequence-parallel group get the same batches (accelerate's sampler seeding, resumption and
    ``skip_first_batches`` stay as they are)."""
    from accelerate.data_loader import prepare_data_loader

    if getattr(loader, "_is_accelerate_prepared", False):
        return loader
    prepared = prepare_data_loader(
        loader, accelerator.device, num_processes=replicas.dp, process_index=replicas.dp_rank,
        split_batches=accelerator.split_batches, put_on_device=accelerator.device_placement,
        rng_types=accelerator.rng_types.copy(), dispatch_batches=accelerator.dispatch_batches,
        even_batches=accelerator.even_batches, use_seedable_sampler=accelerator.use_seedable_sampler,
        data_seed=accelerator.dataloader_config.data_seed, non_blocking=accelerator.non_blocking,
        use_stateful_dataloader=accelerator.use_stateful_dataloader)
    accelerator._dataloaders.append(prepared)
    return prepared


def gather_over_replicas(accelerator, replicas: Replicas, tensor: torch.Tensor, **_: Any) -> torch.Tensor:
    """``accelerator.gather_for_metrics`` of a per-rank tensor whose value is the same on the ranks of a
    sequence-parallel group: one copy per replica, the last batch's padding samples dropped as accelerate
    does. ``[n, ...]`` on each rank -> ``[dp * n (or fewer at the end), ...]``."""
    gathered = accelerator.gather(tensor)
    per_rank = gathered.chunk(replicas.dp * replicas.sp)
    data = torch.cat(per_rank[::replicas.sp])
    state = accelerator.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        data = data[:state.remainder]
    return data


__all__ = ["Replicas", "gather_over_replicas", "prepare_loader_over_replicas", "repair_cpu_deepspeed_state"]
