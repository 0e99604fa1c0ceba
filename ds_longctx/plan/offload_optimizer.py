"""Host memory of DeepSpeed's ZeRO-3 optimizer offload (``offload_optimizer: {"device": "cpu"}``), per rank.

As DeepSpeed 0.19.8 allocates it (``deepspeed/runtime/zero/stage3.py``):

* pinned with ``tensor.pin_memory()`` (``pin_memory: true``, the default), i.e. by torch's pinned host allocator,
  which rounds every buffer up to a power of two:

  - one fp32 gradient buffer per optimizer sub-group (``initialize_optimizer_states``). Sub-groups take the
    rank's parameter partitions in model order and close at the first parameter that brings them to
    ``sub_group_size`` elements (``_create_fp16_sub_groups``);
  - one flat buffer of every gradient partition in the gradient-accumulation dtype, the model's (bf16) unless
    ``data_types.grad_accum_dtype`` says otherwise (``grad_partitions_flat_buffer``);

* pageable: the fp32 master weights (``.to("cpu").clone()``) and Adam's two moments (created by the optimizer
  at its first step), 12 bytes a parameter.

With ``pin_memory: false`` all of it is pageable. On an H200 this reproduces torch's pinned bytes exactly
(bench/results/plan_h200x1.json: 21 GiB for Llama-3.2-3B on one GPU, 1.5 GiB for the 1-layer 8B-wide model).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from .model_spec import ModelSpec
from .settings import ZeroSettings

FP32 = 4


def power_of_two_ceil(nbytes: int) -> int:
    """What torch's pinned host allocator holds for a request of ``nbytes`` (``c10::llvm::PowerOf2Ceil``)."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def parameter_numels(model: ModelSpec) -> List[int]:
    """Elements of each parameter in the order of ``model.parameters()`` (transformers' Llama layout)."""
    h, q, kv, i = model.hidden, model.q_width, model.kv_width, model.intermediate
    layer = [h * q, h * kv, h * kv, q * h, h * i, h * i, i * h, h, h]  # q k v o, gate up down, two norms
    numels = [model.vocab * h] + model.layers * layer + [h]
    if not model.tied_embeddings:
        numels.append(model.vocab * h)
    return numels


@functools.lru_cache(maxsize=64)
def rank_partitions(model: ModelSpec, world: int) -> Tuple[int, ...]:
    """Elements of each parameter's partition on one of ``world`` ranks (``ceil(numel / world)``), in model order.
    Cached: the planner asks for the same model and world at every candidate it judges."""
    return tuple(math.ceil(n / world) for n in parameter_numels(model))


def sub_group_numels(partitions: Sequence[int], sub_group_size: int) -> List[int]:
    """DeepSpeed's optimizer sub-groups of a rank's parameter partitions (elements each)."""
    if sub_group_size <= 0 or sub_group_size >= sum(partitions):
        return [sum(partitions)]
    groups, current = [], 0
    for n in partitions:
        current += n
        if current >= sub_group_size:
            groups.append(current)
            current = 0
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class OptimizerHostBytes:
    """Bytes one rank's offloaded optimizer holds in host memory.

    Attributes:
        pinned_gradients: the fp32 gradient buffers of the sub-groups, each a power of two.
        pinned_gradient_partitions: the flat buffer of gradient partitions, a power of two.
        pageable: fp32 master weights and Adam's moments (and, unpinned, the two above).
    """

    pinned_gradients: int
    pinned_gradient_partitions: int
    pageable: int

    @property
    def pinned(self) -> int:
        return self.pinned_gradients + self.pinned_gradient_partitions


@functools.lru_cache(maxsize=64)
def offload_optimizer_host(model: ModelSpec, world: int, zero: ZeroSettings) -> OptimizerHostBytes:
    """Host bytes of ZeRO-3's CPU optimizer offload for one of ``world`` ranks (each holds ``1/world`` of every
    parameter, rounded up)."""
    partitions = rank_partitions(model, world)
    groups = sub_group_numels(partitions, zero.sub_group_size)
    master_and_moments = 3 * FP32 * sum(partitions)
    if not zero.optimizer_pin_memory:
        pageable = master_and_moments + FP32 * sum(groups) + zero.grad_accum_bytes * sum(partitions)
        return OptimizerHostBytes(pinned_gradients=0, pinned_gradient_partitions=0, pageable=pageable)
    return OptimizerHostBytes(pinned_gradients=sum(power_of_two_ceil(FP32 * n) for n in groups),
                              pinned_gradient_partitions=power_of_two_ceil(zero.grad_accum_bytes * sum(partitions)),
                              pageable=master_and_moments)


__all__ = ["OptimizerHostBytes", "offload_optimizer_host", "parameter_numels", "power_of_two_ceil",
           "rank_partitions", "sub_group_numels"]
