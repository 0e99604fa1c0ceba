"""One handle on a run's long-context setup: the Topology, the validated block, and what uses them.

:func:`ds_longctx.initialize` attaches it to the engine as ``engine.long_context``; a plain torch module
calls ``engine.long_context.attention(q, k, v)`` where it would call its local attention.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

import torch

from ..config import AUTO, LongContextConfig
from ..layout import positions
from ..memory.checkpoint_offload import CheckpointOffload
from ..memory.input_recompute import InputRecompute
from ..topology import Topology
from .watch import RankWatch

if TYPE_CHECKING:
    from .planning import PlanInputs


class LongContext:
    """The :class:`~ds_longctx.topology.Topology` and :class:`~ds_longctx.config.LongContextConfig` of a run."""

    def __init__(self, topology: Topology, config: LongContextConfig, mpu=None, vocab_size: Optional[int] = None,
                 planning: Optional["PlanInputs"] = None, planned_len: Optional[int] = None):
        self.topology = topology
        self.vocab_size = vocab_size  # the model's, when known: shard_batch refuses token ids outside it
        self.mpu = mpu  # the SequenceParallelMPU handed to DeepSpeed, whose group close() releases too
        # The planner's inputs (None: nothing to plan for): "auto" values still in the block resolve at the
        # first batch through shard_batch, and a batch longer than planned_len is checked before it runs.
        self.planning = planning
        self.planned_len = planned_len
        self._use(config)
        self.watch = RankWatch(config.timeout_s)

    def _use(self, config: LongContextConfig) -> None:
        """Make ``config`` the block every later call reads (the attention, tiles and stashes read it per call)."""
        self.config = config
        # One per model: it chains the checkpointed layers to prefetch their inputs a layer ahead in backward.
        # Every size: transformers' layers get only the hidden states positionally (the rest is bound in the
        # function they checkpoint), so those are all a layer's checkpoint saves.
        # A layer count offloads the first layers of each forward only; layers left out of checkpoint_layers
        # open no region, so it counts checkpointed layers.
        offload = config.checkpoint_offload
        self.checkpoint_offload = (CheckpointOffload(min_bytes=0, max_regions=None if offload is True else offload)
                                   if offload not in (False, 0, AUTO) else None)
        # One per model too: it chains the checkpointed layers in forward order to rebuild the inputs it does not keep.
        every = config.checkpoint_every
        self.layer_inputs = InputRecompute(every) if every != AUTO and every > 1 else None

    def during(self, doing: str):
        """Context manager: run a block (e.g. ``"step 12"``) so that when a collective in it breaks, every
        rank raises :class:`~ds_longctx.integration.watch.RankFailure` naming the rank that raised, died or
        hangs and what it was doing (:class:`~ds_longctx.integration.watch.RankWatch`)."""
        return self.watch.during(doing)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: Optional[bool] = None,
                  softmax_scale: Optional[float] = None, cu_seqlens=None) -> torch.Tensor:
        """Exact attention over the group's full sequence with the block's kernel and FPDT settings.

        ``q``: ``[B, S_local, H, D]``, ``k``/``v``: ``[B, S_local, Hkv, D]`` in the zigzag layout;
        returns ``[B, S_local, H, D]``. ``causal`` defaults to the block's ``causal``; ``cu_seqlens``: packed
        documents' boundaries in the full sequence (see :func:`ds_longctx.attention.attention`).
        """
        from ..attention import attention

        return attention(q, k, v, self.topology, causal=self.config.causal if causal is None else causal,
                         softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, **self.config.attention_kwargs())

    def shard_batch(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        """:func:`ds_longctx.integration.data.shard_batch` on this topology (``[B, S] -> [B, S_local]``).

        The first batch resolves the block's "auto" values when ``initialize`` could not (no ``seq_len``);
        a batch longer than any before runs the pre-flight check at its length (see :mod:`.planning`)."""
        from .data import shard_batch

        if self.config.auto_fields:
            self._resolve_at(batch)
        return shard_batch(batch, self.topology, chunk_size=self.config.fpdt.chunk_size, vocab_size=self.vocab_size,
                           length_problem=self._length_problem)

    def _resolve_at(self, batch: Mapping[str, Any]) -> None:
        """The "auto" values from the first batch's global length, agreed by every rank first (collective)."""
        from .agree import agree_on_length
        from .planning import LENGTH_FIX, batch_length, plan_block

        if self.planning is None:
            self.config.require_resolved()
        seq_len = agree_on_length(batch_length(batch), what="the first batch", fix=LENGTH_FIX)
        self.config.check_seq_len(seq_len, what="the first batch's sequence length")
        self._use(plan_block(self.config, self.planning, seq_len))
        self.planned_len = seq_len

    def _length_problem(self, seq_len: int) -> Optional[str]:
        """The pre-flight check of a batch longer than any planned or checked before (no collective: the
        batch's own check raises it on every rank); None when it fits or nothing is checked."""
        from .planning import fit_problem

        # Nothing planned (no seq_len, no "auto"): no check at all, as before the first step without a length.
        if self.planning is None or self.planned_len is None or seq_len <= self.planned_len:
            return None
        problem = fit_problem(self.config, self.planning, seq_len)
        if problem is None:
            self.planned_len = seq_len
        return problem

    def loss(self, logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        """:func:`ds_longctx.integration.loss.causal_lm_loss`: ``[B, S_local, V]``, ``[B, S_local]`` -> scalar."""
        from .loss import causal_lm_loss

        return causal_lm_loss(logits, shift_labels, self.topology)

    def loss_from_hidden(self, hidden: torch.Tensor, head, shift_labels: torch.Tensor,
                         tile_tokens: Optional[int] = None) -> torch.Tensor:
        """:func:`ds_longctx.integration.loss.tiled_causal_lm_loss` over tiles of ``tile_tokens`` (default: the
        block's ``loss_tile_tokens``, else 4096): ``[B, S_local, hidden]``, LM head, ``[B, S_local]`` -> scalar."""
        from .loss import tiled_causal_lm_loss

        if tile_tokens is None:
            self.config.require_resolved()
        tile = tile_tokens or self.config.loss_tile_tokens or 4096
        return tiled_causal_lm_loss(hidden, head, shift_labels, self.topology, tile)

    def positions(self, seq_len: int, device=None) -> torch.Tensor:
        """Global positions of this rank's tokens of a ``seq_len`` sequence (in the FPDT-chunked layout when
        the block sets ``fpdt.chunk_size``). ``[S_local]``."""
        self.config.require_resolved()
        return positions(seq_len, self.topology, device=device, chunk_size=self.config.fpdt.chunk_size)

    def close(self) -> None:
        """Release the run's process groups (the mpu's, then the topology's); every rank, once training is done.

        ``engine.destroy()`` of an engine from :func:`ds_longctx.initialize` calls it. Afterwards the
        attention and the loss raise :class:`~ds_longctx.topology.TopologyError`; ``shard_batch`` still works.
        """
        if self.mpu is not None:
            self.mpu.destroy()
        self.topology.destroy()

    def __deepcopy__(self, memo):
        # Process groups cannot be copied; a copied model shares the run's groups.
        return self

    def __repr__(self) -> str:
        return f"LongContext({self.topology!r}, {self.config!r})"


_ATTR = "_ds_longctx"


def attach(model: torch.nn.Module, lc: LongContext) -> None:
    """Make ``lc`` reachable from every submodule of ``model`` (see :func:`long_context_of`)."""
    for module in model.modules():
        # a plain attribute, not a submodule or buffer: state_dict, .to() and ZeRO do not see it
        object.__setattr__(module, _ATTR, lc)


def long_context_of(module: torch.nn.Module, required: bool = True) -> Optional[LongContext]:
    """The :class:`LongContext` that :func:`ds_longctx.initialize` attached to ``module``.

    With ``required=False`` returns ``None`` for a module that was not set up (e.g. to fall back to a
    local attention in single-process runs).
    """
    lc = getattr(module, _ATTR, None)
    if lc is None and required:
        raise RuntimeError(f"{type(module).__name__} has no long-context setup; build the engine with "
                           f"ds_longctx.initialize(...) (or call ds_longctx.integration.context.attach)")
    return lc


__all__ = ["LongContext", "attach", "long_context_of"]
