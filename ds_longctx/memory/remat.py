"""Rematerialization-aware checkpointing: recompute a layer in backward, except its attention.

Activation checkpointing keeps a layer's input and reruns the layer in backward to rebuild what its
backward reads. For long sequences the attention forward is the most expensive part of that rerun (its
cost grows with ``S^2``, the projections' with ``S``) and the cheapest to keep: its output is one
activation of ``[B, S_local, H, D]`` plus an fp32 log-sum-exp of ``[B, h, S]``. DistFlashAttn
(Li et al., 2023) therefore puts the checkpoint boundary so that the attention output is kept and the
attention is never recomputed; this module does the same for any checkpointed region.

The stash a region runs in and the protocol an attention Function follows are
:mod:`ds_longctx.memory.attention_stash`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.utils.checkpoint

from .attention_stash import AttentionStash
from .checkpoint_offload import CheckpointOffload
from .host_pool import default_pool
from .input_recompute import InputRecompute


def _region_offload(offload: Optional[CheckpointOffload]) -> Optional[CheckpointOffload]:
    """``offload`` if the region about to run is one it moves to host memory, else None (the region then
    keeps its input and kept output on the device)."""
    return offload if offload is not None and offload.takes_next_region() else None


def _stash(keep_attention_output: bool, offload: Optional[CheckpointOffload]) -> AttentionStash:
    return AttentionStash(keep_attention_output, offload.pool or default_pool() if offload is not None else None)


def _run_region(inner: Callable, fn: Callable, args: Tuple, kwargs: Dict[str, Any], keep_attention_output: bool,
                offload: Optional[CheckpointOffload], inputs: Optional[InputRecompute]) -> Any:
    """One checkpointed region: ``inner`` (a checkpoint function) of ``fn`` in its own stash, its saved input in
    host memory when ``offload`` takes this region, or rebuilt in backward when ``inputs`` says so."""
    offload = _region_offload(offload)
    stash = _stash(keep_attention_output, offload)
    run = stash.wrap(fn)
    if inputs is not None:
        with inputs.region(_rerunnable(fn, kwargs, stash), args, offload) as done:
            out = inner(run, *args, **kwargs)
            done(out)
            return out
    if offload is None:
        return inner(run, *args, **kwargs)
    with offload.hooks():
        return inner(run, *args, **kwargs)


def _rerunnable(fn: Callable, kwargs: Dict[str, Any], stash: AttentionStash) -> Callable[[torch.Tensor], Any]:
    """``fn`` as :class:`~ds_longctx.memory.input_recompute.InputRecompute` reruns it in backward: where the
    region keeps its attention outputs, taking them (no attention runs again); else in a stash of its own that
    keeps nothing. Either way the rerun touches neither the region's replay nor a region running around it."""
    if stash.keep_output:
        return lambda hidden: stash.rerun(fn)(hidden, **kwargs)
    return lambda hidden: AttentionStash(keep_output=False).wrap(fn)(hidden, **kwargs)


def checkpoint(fn: Callable, *args: Any, keep_attention_output: bool = True, use_reentrant: bool = False,
               offload: Optional[CheckpointOffload] = None, inputs: Optional[InputRecompute] = None,
               **kwargs: Any) -> Any:
    """:func:`torch.utils.checkpoint.checkpoint` of ``fn(*args, **kwargs)``, except that the distributed
    attention calls inside ``fn`` keep their output and log-sum-exp instead of running again in backward.

    Costs one ``[B, S_local, H, D]`` activation (in q's dtype) and ``[B, h, S]`` fp32 per attention call
    beyond plain checkpointing, and saves one attention forward per call per step. With
    ``keep_attention_output=False`` it is plain checkpointing, which FPDT chunked attention needs too: under
    a plain ``torch.utils.checkpoint`` its chunks from the forward stay alive until backward. With a
    :class:`~ds_longctx.memory.checkpoint_offload.CheckpointOffload` (one per model) the region's saved
    inputs and kept attention outputs wait in host memory until backward (the first ``max_regions`` regions
    of each forward, when it sets a number). With an
    :class:`~ds_longctx.memory.input_recompute.InputRecompute` (one per model) only every ``every``-th region
    keeps its input; the others rebuild it in backward by rerunning the region before them.
    """
    def inner(run: Callable, *run_args: Any, **run_kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(run, *run_args, use_reentrant=use_reentrant, **run_kwargs)

    return _run_region(inner, fn, args, kwargs, keep_attention_output, offload, inputs)


class StashingCheckpoint:
    """A checkpoint function (``fn, *args -> outputs``, the kind transformers keeps in a layer's
    ``_gradient_checkpointing_func``) around ``inner`` that gives each region its own :class:`AttentionStash`,
    with ``offload`` keeps the regions' inputs and kept outputs in host memory, and with ``inputs`` keeps only
    every ``inputs.every``-th region's input (the others rebuilt in backward).

    ``checkpoints=False`` runs ``fn`` as it is, without ``inner``: plain autograd that keeps the layer's
    activations for backward and recomputes nothing (a layer left out of ``checkpoint_layers``). Such a layer
    takes no stash and no offload region, so the offload's layer count covers checkpointed layers only, and
    starts a new group of ``inputs`` (the next checkpointed layer keeps its input)."""

    def __init__(self, inner: Callable, keep_attention_output: bool = True,
                 offload: Optional[CheckpointOffload] = None, checkpoints: bool = True,
                 inputs: Optional[InputRecompute] = None):
        self.inner, self.keep_attention_output, self.offload = inner, keep_attention_output, offload
        self.checkpoints, self.inputs = checkpoints, inputs

    def __call__(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        if not self.checkpoints:
            if self.inputs is not None:
                self.inputs.break_chain()
            return fn(*args, **kwargs)
        return _run_region(self.inner, fn, args, kwargs, self.keep_attention_output, self.offload, self.inputs)

    def __repr__(self) -> str:
        return (f"StashingCheckpoint({self.inner!r}, keep_attention_output={self.keep_attention_output}, "
                f"offload={self.offload!r}, checkpoints={self.checkpoints}, inputs={self.inputs!r})")


__all__ = ["StashingCheckpoint", "checkpoint"]
