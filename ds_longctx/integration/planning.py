"""The block's "auto" values and the pre-flight memory check, at ``initialize`` or at the first batch.

:func:`ds_longctx.initialize` resolves "auto" when it knows the global sequence length
(``long_context.seq_len``, else the training_data's first sample). Without one it keeps the planner's other
inputs (:class:`PlanInputs`) on the engine's :class:`~ds_longctx.integration.context.LongContext`, and
``engine.long_context.shard_batch`` resolves the values from the first batch's length, which sees the whole
sequence: every rank agrees on it first (one all-gather of one integer), then every rank plans alike.
A later batch longer than any planned or checked before gets the pre-flight check again, inside the
batch's own collective check (a data-parallel replica may hold longer batches than another).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..config import BLOCK_KEY, LongContextConfig, LongContextConfigError

#: What the error of a first batch the ranks disagree on tells the user to change.
LENGTH_FIX = (f"the block's \"auto\" values are resolved from the first batch's global sequence length, the same on "
              f"every rank: give every rank first batches of one length (padded, labels -100 on the padding), or set "
              f"{BLOCK_KEY}.seq_len to the run's longest sequence length so that ds_longctx.initialize resolves them")


@dataclass(frozen=True)
class PlanInputs:
    """What the planner reads besides the block and the sequence length, the same on every rank.

    ``model_config``: the transformers config (None: not a transformers model, nothing to plan);
    ``machine``: the :class:`~ds_longctx.plan.machine.Machine` all ranks agreed on (None: no GPU, no plan)."""

    model_config: Any
    ds: Mapping[str, Any]
    world: int
    machine: Any
    micro_batch: int
    checkpointing: bool

    @property
    def can_plan(self) -> bool:
        """Whether a sequence length is all the planner still needs."""
        return self.model_config is not None and self.machine is not None


def plan_block(cfg: LongContextConfig, inputs: PlanInputs, seq_len: Optional[int]) -> LongContextConfig:
    """``cfg`` with its "auto" values resolved and the pre-flight check run (:func:`ds_longctx.plan.preflight.prepare`),
    the resolved values logged once on rank 0. Every rank gets the same answer or the same
    :class:`~ds_longctx.config.LongContextConfigError` (it reads only values the ranks share)."""
    from ..plan.preflight import PlanError, prepare

    try:
        resolved = prepare(cfg, inputs.model_config, inputs.ds, inputs.world, seq_len, inputs.machine,
                           micro_batch=inputs.micro_batch, checkpointing=inputs.checkpointing)
    except PlanError as exc:
        raise LongContextConfigError(str(exc)) from None
    if cfg.auto_fields and _rank() == 0:
        block = resolved.model_dump(mode="json")
        logging.getLogger("ds_longctx").warning("long_context: auto values resolved for %d tokens: %s",
                                                cfg.seq_len or seq_len, {k: _dotted(block, k) for k in cfg.auto_fields})
    return resolved


def fit_problem(cfg: LongContextConfig, inputs: PlanInputs, seq_len: int) -> Optional[str]:
    """The pre-flight check of the resolved ``cfg`` at ``seq_len`` tokens: None when the step fits (or when
    no check applies: ``preflight`` off, no model or machine to plan for), else what does not fit."""
    if not cfg.preflight or not inputs.can_plan:
        return None
    from ..plan.preflight import PlanError, prepare

    try:
        prepare(cfg.model_copy(update={"seq_len": None}), inputs.model_config, inputs.ds, inputs.world, seq_len,
                inputs.machine, micro_batch=inputs.micro_batch, checkpointing=inputs.checkpointing)
    except PlanError as exc:
        return f"a batch of sequence length {seq_len}, longer than any before: {exc}"
    return None


def batch_length(batch: Mapping[str, Any]) -> Optional[int]:
    """The global sequence length of a full ``[B, S]`` batch (``input_ids``, else ``inputs_embeds``), or None."""
    ref = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if ref is None and isinstance(batch, Mapping):
        ref = batch.get("inputs_embeds")
    return int(ref.shape[1]) if torch.is_tensor(ref) and ref.dim() >= 2 else None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _dotted(block: Mapping[str, Any], name: str):
    value: Any = block
    for part in name.split("."):
        value = value[part]
    return value


__all__ = ["LENGTH_FIX", "PlanInputs", "batch_length", "fit_problem", "plan_block"]
