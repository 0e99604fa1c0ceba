"""What ``long_context.host_optimizer_states`` moves off the GPU (:class:`ds_longctx.memory.HostStateAdamW`),
per rank: AdamW's two fp32 moments of each ZeRO-3 optimizer sub-group (the fp32 flat partition DeepSpeed hands
the optimizer), each page-locked exactly (whole pages, no power-of-two rounding: ``memory/pinned.py``), and the
seconds a step spends streaming them through the GPU."""
from __future__ import annotations

import functools
import mmap

from .model_spec import ModelSpec
from .offload_optimizer import FP32, rank_partitions, sub_group_numels
from .rates import Rates
from .settings import ZeroSettings

#: fp32 exp_avg and exp_avg_sq: bytes per parameter of the rank's partition.
MOMENT_BYTES = 2 * FP32
#: HostStateAdamW's device staging: slots and elements per chunk (its defaults, ``memory/host_optimizer.py``).
STAGING_SLOTS = 3
CHUNK_NUMEL = 1 << 24


def _page_round(nbytes: int) -> int:
    return -(-int(nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE


@functools.lru_cache(maxsize=64)
def host_moments_bytes(model: ModelSpec, world: int, zero: ZeroSettings) -> int:
    """Page-locked bytes of one rank's moments: two buffers per optimizer sub-group (each parameter's partition
    ``ceil(numel / world)`` elements, grouped as DeepSpeed groups them)."""
    partitions = rank_partitions(model, world)
    return sum(2 * _page_round(FP32 * n) for n in sub_group_numels(partitions, zero.sub_group_size))


@functools.lru_cache(maxsize=64)
def staging_bytes(model: ModelSpec, world: int, zero: ZeroSettings) -> int:
    """The device slots the moments pass through: both moments of one chunk (at most the largest sub-group) per
    slot, allocated at the first step and kept."""
    partitions = rank_partitions(model, world)
    chunk = min(CHUNK_NUMEL, max(sub_group_numels(partitions, zero.sub_group_size)))
    return STAGING_SLOTS * MOMENT_BYTES * chunk


def moments_step_seconds(model: ModelSpec, world: int, rates: Rates) -> float:
    """One step of the streamed update: the moments in and out over PCIe (the two directions on separate copy
    engines, concurrently) with the device update between, at the rate measured for the whole of it
    (``Rates.moment_stream_bytes``: below one direction's PCIe rate, as both directions share the link)."""
    shard = model.params / world
    return MOMENT_BYTES * shard / rates.moment_stream_bytes


__all__ = ["CHUNK_NUMEL", "MOMENT_BYTES", "STAGING_SLOTS", "host_moments_bytes", "moments_step_seconds",
           "staging_bytes"]
