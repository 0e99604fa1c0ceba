"""``ds_longctx.initialize``: ``deepspeed.initialize`` plus the long-context setup.

Same arguments, same ``(engine, optimizer, training_dataloader, lr_scheduler)`` return. In between it
reads and checks the ``long_context`` block, builds the :class:`~ds_longctx.topology.Topology`, hands
DeepSpeed the :class:`~ds_longctx.integration.mpu.SequenceParallelMPU` (ZeRO partitions over every rank,
gradients sum over sequence ranks and average over replicas), switches a transformers model to the
distributed attention, and attaches a :class:`~ds_longctx.integration.context.LongContext` to the engine
as ``engine.long_context``. Once ``ds_longctx`` is imported, ``deepspeed.initialize`` calls with the block
come here too (:mod:`.deepspeed_hook`).
"""
from __future__ import annotations

import datetime
import os
import threading
import types
from typing import Any, Dict, Mapping, NamedTuple, Optional

from ..config import (BLOCK_KEY, LongContextConfig, LongContextConfigError, load_ds_config, model_head_counts,
                      model_layer_count)
from .agree import agree_on_block
from .context import LongContext
from .optimizer_block import check_host_optimizer, client_optimizer_kwargs
from .planning import PlanInputs, plan_block
from .watch import nccl_error_handling_env

# Set while ds_longctx.initialize hands the engine to DeepSpeed: the deepspeed.initialize hook
# (deepspeed_hook.py) then passes the call to DeepSpeed's own function instead of routing it back here.
_handing_over = threading.local()


def calling_deepspeed() -> bool:
    """Whether this thread is inside ``ds_longctx.initialize``'s call of ``deepspeed.initialize``."""
    return getattr(_handing_over, "depth", 0) > 0


def _config_source(args, config, config_params):
    """Where ``deepspeed.initialize`` would take the config from (it asserts against ambiguous sources)."""
    if config is None and config_params is not None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None:
        if config is not None:
            raise LongContextConfigError("a DeepSpeed config was given both in args.deepspeed_config and as "
                                         "config=; pass only one")
        return from_args
    if config is None:
        raise LongContextConfigError("no DeepSpeed config: pass config=<dict or path> or --deepspeed_config <path>")
    return config


def _first_sample_len(training_data) -> Optional[int]:
    """Sequence length of a map-style dataset's first ``{"input_ids": [S] or [1, S]}`` sample, if cheap to see."""
    try:
        if training_data is None or not hasattr(training_data, "__getitem__") or len(training_data) == 0:
            return None
        sample = training_data[0]
    except Exception:  # noqa: BLE001 - any dataset: knowing the length is a bonus, not a requirement
        return None
    ids = sample.get("input_ids") if isinstance(sample, Mapping) else None
    shape = getattr(ids, "shape", None)
    if shape is None and isinstance(ids, (list, tuple)):
        return len(ids)
    return int(shape[-1]) if shape else None


def _vocab_size(model) -> Optional[int]:
    """A transformers model's vocabulary size (token ids at or above it are refused by shard_batch), or None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    vocab = getattr(config, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def _read(source, model, training_data, optimizer) -> Dict[str, Any]:
    """This rank's view of the setup (no collective): the resolved block, the model's heads, the DS config."""
    ds = load_ds_config(source)
    cfg = LongContextConfig.from_block(ds.get(BLOCK_KEY))
    cfg.check_ds_config(ds)
    if cfg.host_optimizer_states:
        check_host_optimizer(ds, optimizer_given=optimizer is not None)
    layers = model_layer_count(model)
    if layers is not None:
        cfg.check_layers(layers)
    return {"block": cfg.model_dump(mode="json"), "heads": model_head_counts(model),
            "sample_len": _first_sample_len(training_data), "cfg": cfg, "ds": ds}


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               distributed_port: Optional[int] = None, mpu=None, dist_init_required: Optional[bool] = None,
               collate_fn=None, config=None, mesh_param=None, config_params=None):
    """Drop-in for :func:`deepspeed.initialize` that also sets up hybrid Ulysses x ring attention.

    Arguments are those of ``deepspeed.initialize``; the DeepSpeed config (``config``, ``config_params`` or
    ``args.deepspeed_config``) may carry a ``"long_context"`` block (:class:`~ds_longctx.config.LongContextConfig`;
    without one the degrees are 1 and the run is plain DeepSpeed with the model on the local kernel).

    Errors a user can cause (bad block, blocks that differ between ranks, degrees that do not divide the
    world, more Ulysses ranks than heads, a dataset sequence length the layout cannot split, an own ``mpu``
    or ``mesh_param`` with sequence parallelism) raise :class:`~ds_longctx.config.LongContextConfigError`
    on every rank alike.

    A transformers model is switched to the distributed attention (:mod:`.hf`); any other module reaches
    it through ``ds_longctx.integration.context.long_context_of(self).attention(q, k, v)``.

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)`` as ``deepspeed.initialize``; the engine
        carries ``engine.long_context`` (:class:`~ds_longctx.integration.context.LongContext`: topology,
        config, ``attention``, ``shard_batch``, ``loss``). Batches must be sharded
        (``engine.long_context.shard_batch(batch)``) before the forward pass. "auto" values of the block
        are resolved here from ``long_context.seq_len`` (else the training_data's first sample), else by
        the first ``shard_batch`` from that batch's global sequence length.
    """
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from ..topology import Topology

    if model is None:
        raise ValueError("ds_longctx.initialize requires a model (as deepspeed.initialize does)")
    try:
        mine: Any = _read(_config_source(args, config, config_params), model, training_data, optimizer)
    except LongContextConfigError as exc:
        mine = exc
    # The config may be unreadable on this rank only; the error is shared below, after the world is up.
    backend = get_accelerator().communication_backend_name()
    init_kwargs = {"dist_backend": backend, "dist_init_required": dist_init_required}
    timeout_s = None if isinstance(mine, BaseException) else mine["cfg"].timeout_s
    if timeout_s is not None:  # a world this call creates gets it; an existing one keeps its own
        init_kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        nccl_error_handling_env()
    if distributed_port is not None:
        init_kwargs["distributed_port"] = distributed_port
    ds_dist.init_distributed(**init_kwargs)
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" and "LOCAL_RANK" in os.environ:
        # DeepSpeed selects the device only inside its engine; the object gathers below run before it and
        # NCCL sends objects through the current device, which must differ between ranks of a node.
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))

    shared = mine if isinstance(mine, BaseException) else {k: v for k, v in mine.items() if k not in ("cfg", "ds")}
    agree_on_block(shared, what=f"{BLOCK_KEY} block / model heads / dataset sequence length")
    cfg: LongContextConfig = mine["cfg"]
    world = dist.get_world_size()
    cfg.check_world(world)
    if mine["heads"] is not None:
        cfg.check_heads(*mine["heads"])
    if mine["sample_len"] is not None:
        cfg.check_seq_len(mine["sample_len"], what="training_data sequence length")
    if mpu is not None and cfg.sp_degree > 1:
        raise LongContextConfigError(
            "an mpu was passed together with sequence parallelism (long_context.ulysses_degree x ring_degree = "
            f"{cfg.sp_degree}); ds_longctx builds DeepSpeed's mpu itself and does not combine with tensor or "
            "pipeline parallelism: drop the mpu argument or set both degrees to 1")
    if mesh_param is not None and cfg.sp_degree > 1:
        raise LongContextConfigError(
            "mesh_param builds DeepSpeed's own data x sequence-parallel mesh, which conflicts with long_context "
            f"(ulysses_degree x ring_degree = {cfg.sp_degree}); drop mesh_param")

    planned = _plan_block(cfg, model, load_ds_config(_config_source(args, config, config_params)), world,
                          mine["sample_len"])
    topo = Topology(ulysses=cfg.ulysses_degree, ring=cfg.ring_degree, timeout_s=cfg.timeout_s)
    ours = None
    if cfg.sp_degree > 1:
        from .mpu import SequenceParallelMPU
        mpu = ours = SequenceParallelMPU(topo)
    lc = LongContext(topo, planned.config, mpu=ours, vocab_size=_vocab_size(model), planning=planned.inputs,
                     planned_len=planned.seq_len)

    from .context import attach
    from .hf import apply, is_hf_model

    ds_kwargs: Dict[str, Any] = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                     training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                                     dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                                     mesh_param=mesh_param, config_params=config_params)
    if distributed_port is not None:
        ds_kwargs["distributed_port"] = distributed_port
    if cfg.host_optimizer_states:  # AdamW from the optimizer block, its moments in host memory
        ds_kwargs.update(client_optimizer_kwargs(mine["ds"], model, model_parameters, args))
    try:
        if is_hf_model(model):
            apply(model, lc)
        else:
            attach(model, lc)  # its attention reaches lc through long_context_of(self)
        _handing_over.depth = getattr(_handing_over, "depth", 0) + 1
        try:  # the module attribute: other libraries' wrappers of it run too
            engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(**ds_kwargs)
        finally:
            _handing_over.depth -= 1
    except BaseException:
        lc.close()  # no engine will own the groups: a caller that catches this must not inherit them
        raise
    engine.long_context = lc
    _release_groups_on_destroy(engine, lc)
    return engine, ds_optimizer, dataloader, scheduler


def _agreed_machine(world: int):
    """The machine as every rank sees it, agreed on (the smallest GPU and host memory of any rank), so that
    all ranks plan alike; None without CUDA (plans are for GPUs) unless ``DS_LONGCTX_MACHINE`` states the
    facts. Collective over the world."""
    import torch
    import torch.distributed as dist

    from ..plan.machine import GIB, Machine, facts_from_env, host_available_bytes

    local = None
    stated = facts_from_env()
    if stated is not None:
        local = (int(stated["gpu_memory_gib"] * GIB), int(stated["host_memory_gib"] * GIB),
                 stated.get("gpu_name", "NVIDIA H200"), int(stated.get("gpus_per_node", world)))
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
        local = (int(props.total_memory), int(host_available_bytes() or 0), props.name, per_node)
    facts = [None] * world
    dist.all_gather_object(facts, local)
    if any(f is None for f in facts):
        return None
    return Machine(gpus=world, gpu_memory=min(f[0] for f in facts), host_memory=min(f[1] for f in facts),
                   gpu_name=facts[0][2], gpus_per_node=min(f[3] for f in facts))


class Planned(NamedTuple):
    """The block as the first step will read it, and what a batch needs to plan or check it later."""

    config: LongContextConfig  # "auto" values left when no sequence length was known (resolved at the first batch)
    inputs: Optional[PlanInputs]  # None: no model or machine to plan for
    seq_len: Optional[int]  # the length planned and checked for, if any


def _plan_block(cfg: LongContextConfig, model, ds: Mapping[str, Any], world: int,
                sample_len: Optional[int]) -> Planned:
    """Resolve the block's "auto" values and run the pre-flight check (:mod:`ds_longctx.plan`) on the
    agreed machine; every rank computes the same answer from shared values, so errors are raised everywhere.
    Without a sequence length (``seq_len``, the dataset's first sample) the values stay "auto" until the
    first batch passes through ``engine.long_context.shard_batch`` (:mod:`.planning`).
    Pinned host buffers of the offload pool are limited to the host memory each rank may use."""
    from ..memory.host_pool import default_pool

    machine = _agreed_machine(world) if (cfg.auto_fields or cfg.preflight) else None
    micro = ds.get("train_micro_batch_size_per_gpu", 1)
    inputs = PlanInputs(model_config=getattr(model, "config", None) if model_head_counts(model) is not None else None,
                        ds=ds, world=world, machine=machine, micro_batch=micro if isinstance(micro, int) else 1,
                        checkpointing=bool(getattr(model, "is_gradient_checkpointing", True)))
    if machine is not None and machine.host_memory:
        default_pool().limit_bytes = _pool_limit(machine, inputs, cfg.host_optimizer_states)
    seq_len = cfg.seq_len or sample_len
    planned = cfg if (seq_len is None and cfg.auto_fields and inputs.can_plan) else plan_block(cfg, inputs, seq_len)
    return Planned(config=planned, inputs=inputs if inputs.can_plan else None, seq_len=seq_len)


def _pool_limit(machine, inputs: PlanInputs, host_optimizer_states: bool = False) -> int:
    """Bytes the offload pool may page-lock per rank: the host memory each GPU's process may use, less what
    DeepSpeed's offloaded optimizer pins itself (its fp32 gradient sub-groups and bf16 gradient partitions) or
    what HostStateAdamW pins (the AdamW moments of the rank's partition), so that together they never pin more
    than the host has."""
    limit = machine.host_memory_per_gpu
    if inputs.model_config is None:
        return limit
    from ..plan import ModelSpec, ZeroSettings
    from ..plan.host_optimizer import host_moments_bytes
    from ..plan.offload_optimizer import offload_optimizer_host

    zero = ZeroSettings.from_ds_config(inputs.ds)
    model = ModelSpec.from_config(inputs.model_config)
    if zero.optimizer_offload:
        return max(0, limit - offload_optimizer_host(model, inputs.world, zero).pinned)
    if host_optimizer_states:
        return max(0, limit - host_moments_bytes(model, inputs.world, zero))
    return limit


def _release_groups_on_destroy(engine, lc: LongContext) -> None:
    """``engine.destroy()`` also releases the groups ds_longctx built for the engine (``LongContext.close``).

    Bound to the engine itself, not through a weak reference: DeepSpeed's ``__del__`` calls ``destroy``,
    and by then the garbage collector has already cleared weak references to the engine."""
    deepspeed_destroy = type(engine).destroy

    def destroy(self):
        try:
            deepspeed_destroy(self)
        finally:
            lc.close()

    destroy.__doc__ = deepspeed_destroy.__doc__
    engine.destroy = types.MethodType(destroy, engine)


__all__ = ["initialize", "calling_deepspeed"]
