"""Hugging Face transformers models on the distributed attention, unmodified.

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
``checkpoint_offload`` each layer's input and kept attention output wait in pinned host memory.
With ``mlp_tile_tokens`` the decoder layers' MLPs run over sequence tiles (:mod:`ds_longctx.memory.tiling`),
and with ``lean_rms_norm`` (default) the RMSNorms keep only their input for backward (:mod:`ds_longctx.memory.norms`).

A call with ``shift_labels=`` (from :func:`~ds_longctx.integration.data.shard_batch`) returns the
sequence-parallel group's loss in ``.loss`` (:func:`~ds_longctx.integration.loss.causal_lm_loss`); with
``loss_tile_tokens`` the model computes no logits and the loss runs the LM head tile by tile from the final
hidden states (:func:`~ds_longctx.integration.loss.tiled_causal_lm_loss`). ``labels=`` is refused under
sequence parallelism: the model's own loss would shift inside each rank's shard.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from ..attention.documents import Documents
from ..memory.checkpoint_offload import CheckpointOffload
from ..memory.norms import lean_rms_norms
from ..memory.remat import StashingCheckpoint
from ..memory.tiling import tile_module, untile_module
from .context import LongContext, attach, long_context_of

ATTN_IMPLEMENTATION = "ds_longctx"
_HOOK_ATTR = "_ds_longctx_hook"
_REQUEST_ATTR = "_ds_longctx_loss_request"


class HFModelError(ValueError):
    """A model or call the distributed attention cannot serve; the message says what to change."""


def hf_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                 **kwargs: Any):
    """transformers attention function: ``query`` ``[B, H, S_local, D]``, ``key``/``value``
    ``[B, Hkv, S_local, D]`` (the model's layout) -> ``([B, S_local, H, D], None)``.

    Every check reads values all ranks share (shapes, module config), so a failure is raised everywhere.
    """
    lc = long_context_of(module, required=False)
    if lc is None:
        raise HFModelError(f"{type(module).__name__} uses attn_implementation={ATTN_IMPLEMENTATION!r} but was "
                           f"not set up for it; call ds_longctx.initialize(...) or "
                           f"ds_longctx.integration.hf.apply(model, long_context)")
    topo = lc.topology
    seq_len = query.shape[2] * topo.sp
    if attention_mask is not None:
        raise HFModelError("an attention mask reached the distributed attention; it applies its own causal mask "
                           "over global positions: drop attention_mask (pad on the right with labels -100)")
    if dropout:
        raise HFModelError(f"attention dropout {dropout} is not supported by the distributed attention; set the "
                           f"model config's attention_dropout to 0")
    window = kwargs.get("sliding_window")
    if window is not None and window < seq_len:
        raise HFModelError(f"{type(module).__name__} uses a sliding window of {window} tokens, shorter than the "
                           f"{seq_len}-token sequence; the distributed attention is full causal attention: set "
                           f"sliding_window=None (use_sliding_window=False) in the model config or use sequences "
                           f"of at most {window} tokens")
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise HFModelError(f"{type(module).__name__} passes {unsupported}, which the distributed attention "
                               f"does not implement")
    docs = _documents(kwargs, seq_len)
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", lc.config.causal)
    out = lc.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                       causal=bool(causal), softmax_scale=scaling, cu_seqlens=docs)
    return out, None


def _documents(kwargs, seq_len: int) -> Optional[Documents]:
    """Packed documents of the call: ``cu_seq_lens_q`` (``cu_seq_lens_k`` must agree), the boundaries of the
    *full* sequence (as :func:`~ds_longctx.integration.data.shard_batch` gives them), or None."""
    found = [Documents.of(kwargs[key], seq_len) for key in ("cu_seq_lens_q", "cu_seq_lens_k")
             if kwargs.get(key) is not None]
    if len(found) == 2 and found[0] != found[1]:
        raise HFModelError("cu_seq_lens_q and cu_seq_lens_k differ; the distributed attention is self-attention "
                           "over one packing of the sequence")
    return found[0] if found else None


def register() -> None:
    """Register :func:`hf_attention` in transformers' attention registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention)


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers needlessly)."""
    import sys

    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


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


class _LossRequest:
    """A call's ``shift_labels``, the loss tile, and (tiled) the final hidden states the base model returned."""

    def __init__(self, shift_labels: torch.Tensor, tile_tokens: Optional[int]):
        self.shift_labels, self.tile_tokens = shift_labels, tile_tokens
        self.hidden: Optional[torch.Tensor] = None


def _set_request(model: torch.nn.Module, request: Optional[_LossRequest]) -> None:
    object.__setattr__(model, _REQUEST_ATTR, request)
    base = getattr(model, "base_model", model)
    if base is not model:
        object.__setattr__(base, _REQUEST_ATTR, request)


def _loss_request(model: torch.nn.Module, lc: LongContext, signature, arguments) -> Optional[_LossRequest]:
    """The loss the call asks for with ``shift_labels=`` (taken out of ``arguments``); refuses ``labels``
    under sequence parallelism, where the model's own loss would shift labels inside each rank's shard."""
    shift_labels = arguments.pop("shift_labels", None)
    if arguments.get("labels") is not None and lc.topology.sp > 1:
        raise HFModelError("labels= makes the model shift labels inside each rank's shard and average per rank; "
                           "pass shift_labels=batch['shift_labels'] (from shard_batch) instead: the output's .loss "
                           "is then the mean over the whole sequence's valid tokens")
    if shift_labels is None:
        return None
    tile = lc.config.loss_tile_tokens
    if tile is not None:
        if "logits_to_keep" not in signature.parameters or getattr(model, "base_model", model) is model:
            raise HFModelError(f"{type(model).__name__} has no logits_to_keep argument or no base model, which "
                               f"long_context.loss_tile_tokens needs; set loss_tile_tokens to null")
        # no logits at all from the model: the loss computes them tile by tile from the final hidden states
        arguments["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=shift_labels.device)
    return _LossRequest(shift_labels, tile)


def _capture_hidden(base: torch.nn.Module, args, output):
    """Forward hook of the base model: keep the final hidden states for a tiled loss."""
    request = getattr(base, _REQUEST_ATTR, None)
    if request is not None and request.tile_tokens is not None:
        request.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _finish_call(model: torch.nn.Module, args, kwargs, output):
    """Forward hook: with ``shift_labels=`` in the call, put the sequence-parallel group's loss in ``.loss``."""
    request = getattr(model, _REQUEST_ATTR, None)
    if request is None:
        return None
    _set_request(model, None)
    lc = long_context_of(model)
    if request.tile_tokens is not None:
        if request.hidden is None:
            raise HFModelError(f"{type(model).__name__}'s base model returned no hidden states to the loss")
        loss = lc.loss_from_hidden(request.hidden, model.get_output_embeddings(), request.shift_labels,
                                   request.tile_tokens)
    else:
        loss = lc.loss(output.logits, request.shift_labels)
    output["loss"] = loss
    return output


def _prepare_call(model: torch.nn.Module, args, kwargs):
    """Forward pre-hook: pass the global positions as ``position_ids`` when the caller gives none, turn
    the KV cache off unless asked for (a cache of one rank's keys means nothing to the other ranks), take
    ``shift_labels`` out of the call for the group loss, turn ``cu_seq_lens_q/_k`` (packed documents) into
    :class:`~ds_longctx.attention.documents.Documents` once for all layers, and put the layers' checkpoint
    functions (set by ``gradient_checkpointing_enable`` at any time) in stashes."""
    lc = long_context_of(model)
    _set_request(model, None)
    stash_checkpoints(model, lc.config.keep_attention_output, lc.checkpoint_offload)
    if lc.checkpoint_offload is not None:
        lc.checkpoint_offload.begin_forward()
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None  # let the model raise its own error for a bad call
    arguments = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and name in arguments:
            return None  # cannot rebuild such a call by name; leave it as it is
    if arguments.get("attention_mask") is not None:
        # transformers builds no mask for this attention, so a padding mask would be dropped silently
        raise HFModelError("attention_mask is not supported with ds_longctx attention (the attention is causal over "
                           "global positions); drop it, or pass the batch through shard_batch, which checks that it "
                           "is all ones and drops it")
    request = _loss_request(model, lc, signature, arguments)
    changed = request is not None
    ref = arguments.get("input_ids")
    if ref is None:
        ref = arguments.get("inputs_embeds")
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        cu = arguments.get(key)
        if cu is not None and not isinstance(cu, Documents) and ref is not None:
            # once per call instead of once per layer (a tensor on the GPU would sync in every layer)
            arguments[key] = Documents.of(cu, ref.shape[1] * lc.topology.sp)
            changed = True
    if "use_cache" in signature.parameters and arguments.get("use_cache") is None:
        arguments["use_cache"] = False
        changed = True
    if arguments.get("position_ids") is None and ref is not None:
        seq_len = ref.shape[1] * lc.topology.sp
        lc.config.check_seq_len(seq_len, what=f"global sequence length (local {ref.shape[1]} x sp {lc.topology.sp})")
        arguments["position_ids"] = lc.positions(seq_len, device=ref.device).unsqueeze(0)
        changed = True
    _set_request(model, request)
    return ((), arguments) if changed else None


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
    stash_checkpoints(model, lc.config.keep_attention_output, lc.checkpoint_offload)
    tile_mlps(model, lc.config.mlp_tile_tokens)
    lean_rms_norms(model, lc.config.lean_rms_norm)
    for old in getattr(model, _HOOK_ATTR, None) or ():
        old.remove()
    hooks = [model.register_forward_pre_hook(_prepare_call, with_kwargs=True),
             model.register_forward_hook(_finish_call, with_kwargs=True)]
    base = getattr(model, "base_model", model)
    if base is not model:
        hooks.append(base.register_forward_hook(_capture_hidden))
    object.__setattr__(model, _HOOK_ATTR, hooks)
    return model


__all__ = ["ATTN_IMPLEMENTATION", "HFModelError", "apply", "hf_attention", "is_hf_model", "register",
           "stash_checkpoints", "tile_mlps"]
