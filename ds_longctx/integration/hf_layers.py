"""The layer changes :func:`~ds_longctx.integration.hf.apply` makes to a transformers model: checkpoint
functions in attention stashes (only the first ``checkpoint_layers`` decoder layers checkpointing, only every
``checkpoint_every``-th keeping its input), and MLPs over sequence tiles. Both follow the block the run's
:class:`~ds_longctx.integration.context.LongContext` holds at each forward (:func:`configure_layers`), so
"auto" values resolved at the first batch take effect before the first forward."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..checkpoint_pattern import KeepAttentionOutput, keeps_attention_output
from ..memory.checkpoint_offload import CheckpointOffload
from ..memory.input_recompute import InputRecompute
from ..memory.remat import StashingCheckpoint
from ..memory.tiling import tile_module, untile_module
from .context import LongContext

_TILES_ATTR = "_ds_longctx_mlp_tile_tokens"
_UNSET = object()


def configure_layers(model: torch.nn.Module, lc: LongContext) -> None:
    """Checkpoint stashes, checkpointed layers and MLP tiles of ``model`` as ``lc.config`` sets them (cheap when
    they already are; nothing while the block still has "auto" values: the forward pre-hook refuses to run then)."""
    cfg = lc.config
    if cfg.auto_fields:
        return
    if cfg.checkpoint_layers is not None:
        cfg.check_layers(_decoder_layer_count(model))
    stash_checkpoints(model, cfg.keep_attention_output, lc.checkpoint_offload, cfg.checkpoint_layers, lc.layer_inputs,
                      every=cfg.checkpoint_every)
    if model.__dict__.get(_TILES_ATTR, _UNSET) != cfg.mlp_tile_tokens:
        tile_mlps(model, cfg.mlp_tile_tokens)
        object.__setattr__(model, _TILES_ATTR, cfg.mlp_tile_tokens)


def _checkpoint_owners(model: torch.nn.Module) -> List[Tuple[torch.nn.Module, bool]]:
    """The modules holding a checkpoint function, each with whether it is a decoder layer (transformers'
    ``GradientCheckpointingLayer``, in model order), the modules ``checkpoint_layers`` counts."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [(module, isinstance(module, GradientCheckpointingLayer)) for module in model.modules()
            if module.__dict__.get("_gradient_checkpointing_func") is not None]


def stash_checkpoints(model: torch.nn.Module, keep_attention_output: KeepAttentionOutput,
                      offload: Optional[CheckpointOffload] = None, checkpoint_layers: Optional[int] = None,
                      inputs: Optional[InputRecompute] = None, every: int = 1) -> int:
    """Wrap the checkpoint function of every checkpointing layer of ``model`` (transformers'
    ``_gradient_checkpointing_func``) in a :class:`~ds_longctx.memory.remat.StashingCheckpoint`, or rewrap
    it with a new ``keep_attention_output`` / ``offload`` / ``inputs`` (an
    :class:`~ds_longctx.memory.input_recompute.InputRecompute`: only every N-th layer keeps its input). With
    ``checkpoint_layers`` N only the first N decoder layers checkpoint; the others' wrappers run the layer
    without checkpointing (whatever ``gradient_checkpointing_enable`` set, which may run again at any time: the
    forward pre-hook calls this every forward). ``keep_attention_output`` ``"reruns"``: only the decoder layers
    whose outputs reruns take keep them (:func:`~ds_longctx.checkpoint_pattern.keeps_attention_output`, groups of
    ``every``). Returns the number of layers wrapped now."""
    owners = _checkpoint_owners(model)
    layers = sum(is_layer for _, is_layer in owners)
    checkpointed = layers if checkpoint_layers is None else min(layers, checkpoint_layers)
    wrapped, index = 0, 0
    for module, is_layer in owners:
        checkpoints = not is_layer or index < checkpointed
        keep = (keeps_attention_output(keep_attention_output, index, every, checkpointed) if is_layer
                else keep_attention_output is True)
        index += is_layer
        fn = module._gradient_checkpointing_func
        if isinstance(fn, StashingCheckpoint):
            if (fn.keep_attention_output == keep and fn.offload is offload
                    and fn.checkpoints == checkpoints and fn.inputs is inputs):
                continue
            fn = fn.inner
        module._gradient_checkpointing_func = StashingCheckpoint(fn, keep, offload, checkpoints=checkpoints,
                                                                 inputs=inputs)
        wrapped += 1
    return wrapped


def _decoder_layer_count(model: torch.nn.Module) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules())


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
