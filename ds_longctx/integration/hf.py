"""Hugging Face transformers models on the distributed attention, unmodified: :func:`apply`.

The work is split by job: ``hf_attention.py`` (the attention function and its registration),
``hf_call.py`` (the forward pre-hook: positions, documents, cache, checkpoint stashes),
``hf_layers.py`` (checkpoint stashes, MLP tiles), ``hf_loss.py`` (the group loss from ``shift_labels=``).

transformers' attention modules (Llama, Qwen2/Qwen3, Mistral, ...) call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, scaling=..., **kwargs)``.
:func:`apply` registers :func:`hf_attention` under the name ``"ds_longctx"`` and switches the model to it.
The run's :class:`~ds_longctx.integration.context.LongContext` rides on the modules themselves (the registry
is global, a run's process groups are not), so two models in one process may use different topologies.

No mask function is registered for the name, so transformers builds no attention mask (it would be
``S_local x S_local`` and wrong across ranks): causality comes from global positions inside the attention.
RoPE comes from ``position_ids``: the model must see the global positions of its tokens, which
:func:`ds_longctx.integration.data.shard_batch` returns, and which a forward pre-hook fills in when the
caller passes none (the model's own default, ``arange(S_local)``, would be wrong on every rank but the first).
The hook also turns the KV cache off unless the caller asks for it, and refuses an ``attention_mask``.
Packed documents arrive as ``cu_seq_lens_q`` (the boundaries of the full sequence, from ``shard_batch``):
the attention keeps each token inside its document, as transformers does on one device for position ids
that restart per document.

With activation checkpointing on (``model.gradient_checkpointing_enable()``, before or after
:func:`apply`), the hook wraps each layer's checkpoint function in a
:class:`~ds_longctx.memory.remat.StashingCheckpoint`: the recompute of a layer in backward takes the
attention's output from the forward instead of running the attention again (``keep_attention_output``), and
FPDT's offloaded chunks are built once, by the recompute, instead of living from forward to backward; with
``checkpoint_offload`` each layer's input and kept attention output wait in pinned host memory. With
``checkpoint_layers`` N only the first N decoder layers checkpoint; the wrappers of the others run their layer
without checkpointing (no recompute, no stash, no offload), whatever ``gradient_checkpointing_enable`` set.
With ``mlp_tile_tokens`` the decoder layers' MLPs run over sequence tiles (:mod:`ds_longctx.memory.tiling`),
and with ``lean_rms_norm`` (default) the RMSNorms keep only their input for backward (:mod:`ds_longctx.memory.norms`).

A call with ``shift_labels=`` (from :func:`~ds_longctx.integration.data.shard_batch`) returns the
sequence-parallel group's loss in ``.loss`` (:func:`~ds_longctx.integration.loss.causal_lm_loss`); with
``loss_tile_tokens`` the model computes no logits and the loss runs the LM head tile by tile from the final
hidden states (:func:`~ds_longctx.integration.loss.tiled_causal_lm_loss`). ``labels=`` is refused under
sequence parallelism: the model's own loss would shift inside each rank's shard.
"""
from __future__ import annotations

from typing import Any

import torch

from ..memory.gated_mlp import fuse_gated_mlps
from ..memory.norms import lean_rms_norms
from .context import LongContext, attach
from .hf_attention import ATTN_IMPLEMENTATION, HFModelError, hf_attention, register
from .hf_call import prepare_call
from .hf_layers import configure_layers, stash_checkpoints, tile_mlps
from .hf_loss import capture_hidden, finish_call
from .hf_rotary import fuse_rotary

_HOOK_ATTR = "_ds_longctx_hook"


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers needlessly)."""
    import sys

    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def apply(model: torch.nn.Module, lc: LongContext) -> torch.nn.Module:
    """Switch a transformers model to the distributed attention of ``lc`` (in place; returns the model).

    Checks the head counts against ``ulysses_degree`` and that the model dispatches its attention through
    transformers' registry (models that do not would silently keep their local attention).
    """
    lc.config.check_model(model)
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # transformers < 4.53
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        raise HFModelError(f"{type(model).__name__} does not dispatch attention through transformers' "
                           f"AttentionInterface, so its attention cannot be replaced; call "
                           f"engine.long_context.attention(q, k, v) from the model's attention instead")
    attach(model, lc)
    configure_layers(model, lc)
    lean_rms_norms(model, lc.config.lean_rms_norm, fused=lc.config.fused_norms)
    fuse_gated_mlps(model, lc.config.fused_gated_mlp)
    fuse_rotary(model, lc.config.fused_rope)
    for old in getattr(model, _HOOK_ATTR, None) or ():
        old.remove()
    hooks = [model.register_forward_pre_hook(prepare_call, with_kwargs=True),
             model.register_forward_hook(finish_call, with_kwargs=True)]
    base = getattr(model, "base_model", model)
    if base is not model:
        hooks.append(base.register_forward_hook(capture_hidden))
    object.__setattr__(model, _HOOK_ATTR, hooks)
    return model


__all__ = ["ATTN_IMPLEMENTATION", "HFModelError", "apply", "hf_attention", "is_hf_model", "register",
           "stash_checkpoints", "tile_mlps"]
