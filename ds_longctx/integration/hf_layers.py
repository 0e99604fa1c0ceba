"""The layer changes :func:`~ds_longctx.integration.hf.apply` makes to a transformers model: checkpoint
functions in attention stashes, and MLPs over sequence tiles. Both follow the block the run's
:class:`~ds_longctx.integration.context.LongContext` holds at each forward (:func:`configure_layers`), so
"auto" values resolved at the first batch take effect before the first forward."""
from __future__ import annotations

from typing import Optional

import torch

from ..memory.checkpoint_offload import CheckpointOffload
from ..memory.remat import StashingCheckpoint
from ..memory.tiling import tile_module, untile_module
from .context import LongContext

_TILES_ATTR = "_ds_longctx_mlp_tile_tokens"
_UNSET = object()


def configure_layers(model: torch.nn.Module, lc: LongContext) -> None:
    """Checkpoint stashes and MLP tiles of ``model`` as ``lc.config`` sets them (cheap when they already are;
    nothing while the block still has "auto" values: the forward pre-hook refuses to run then)."""
    cfg = lc.config
    if cfg.auto_fields:
        return
    stash_checkpoints(model, cfg.keep_attention_output, lc.checkpoint_offload)
    if model.__dict__.get(_TILES_ATTR, _UNSET) != cfg.mlp_tile_tokens:
        tile_mlps(model, cfg.mlp_tile_tokens)
        object.__setattr__(model, _TILES_ATTR, cfg.mlp_tile_tokens)


def stash_checkpoints(model: torch.nn.Module, keep_attention_output: bool,
                      offload: Optional[CheckpointOffload] = None) -> int:
    """Wrap the checkpoint function of every checkpointing layer of ``model`` (transformers'
    ``_gradient_checkpointing_func``) in a :class:`~ds_longctx.memory.remat.StashingCheckpoint`, or rewrap
    it with a new ``keep_attention_output`` / ``offload``. Returns the number of layers wrapped now."""
    wrapped = 0
    for module in model.modules():
        fn = module.__dict__.get("_gradient_checkpointing_func")
        if fn is None:
            continue
        if isinstance(fn, StashingCheckpoint):
            if fn.keep_attention_output == keep_attention_output and fn.offload is offload:
                continue
            fn = fn.inner
        module._gradient_checkpointing_func = StashingCheckpoint(fn, keep_attention_output, offload)
        wrapped += 1
    return wrapped


def tile_mlps(model: torch.nn.Module, tile_tokens: Optional[int]) -> int:
    """Run the ``mlp`` of every decoder layer of ``model`` over sequence tiles of ``tile_tokens`` tokens
    (:func:`ds_longctx.memory.tiling.tile_module`; None: untiled). Returns the number of MLPs tiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        if not isinstance(layer, GradientCheckpointingLayer) or not isinstance(mlp, torch.nn.Module):
            continue
        untile_module(mlp)
        if tile_tokens is not None:
            tile_module(mlp, tile_tokens)
            n += 1
    return n


__all__ = ["configure_layers", "stash_checkpoints", "tile_mlps"]
