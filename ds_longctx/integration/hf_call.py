"""The forward pre-hook of a transformers model on the distributed attention: each call's arguments made
right for sequence parallelism, one job per function.

* a block with "auto" values left (no ``shard_batch`` yet) is refused;
* the layers' checkpoint functions go into attention stashes (``gradient_checkpointing_enable`` may run
  at any time, so every call looks) and the MLPs into tiles as the block sets them, and the checkpoint
  offload starts counting this forward's regions;
* ``attention_mask`` is refused (transformers builds no mask for this attention, so it would be dropped);
* ``shift_labels`` is taken out of the call for the group loss (:mod:`~ds_longctx.integration.hf_loss`);
* ``cu_seq_lens_q/_k`` (packed documents) become :class:`~ds_longctx.attention.documents.Documents` once
  for all layers;
* the KV cache is off unless the caller asks for it (a cache of one rank's keys means nothing to the others);
* ``position_ids`` are the global positions of this rank's tokens when the caller gives none (the model's
  own default, ``arange(S_local)``, would be wrong on every rank but the first).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch

from ..attention.documents import Documents
from .context import LongContext, long_context_of
from .hf_attention import HFModelError
from .hf_layers import configure_layers
from .hf_loss import loss_request, set_request


def _bind(signature: inspect.Signature, args, kwargs) -> Optional[Dict[str, Any]]:
    """The call's arguments by name (``**kwargs`` flattened in), or None for a call that cannot be rebuilt
    by name (a bad call, which the model reports itself, or one through ``*args``)."""
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None
    arguments = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and name in arguments:
            return None
    return arguments


def _refuse_attention_mask(arguments: Dict[str, Any]) -> None:
    if arguments.get("attention_mask") is not None:
        # transformers builds no mask for this attention, so a padding mask would be dropped silently
        raise HFModelError("attention_mask is not supported with ds_longctx attention (the attention is causal over "
                           "global positions); drop it, or pass the batch through shard_batch, which checks that it "
                           "is all ones and drops it")


def _tokens(arguments: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The tensor whose dim 1 is the local sequence: ``input_ids``, else ``inputs_embeds``."""
    ref = arguments.get("input_ids")
    return arguments.get("inputs_embeds") if ref is None else ref


def _documents_once(arguments: Dict[str, Any], lc: LongContext, tokens: Optional[torch.Tensor]) -> bool:
    """Packed documents as :class:`Documents`, once per call instead of once per layer (a tensor on the GPU
    would sync in every layer). Returns whether the arguments changed."""
    changed = False
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        cu = arguments.get(key)
        if cu is not None and not isinstance(cu, Documents) and tokens is not None:
            arguments[key] = Documents.of(cu, tokens.shape[1] * lc.topology.sp)
            changed = True
    return changed


def _cache_off(arguments: Dict[str, Any], signature: inspect.Signature) -> bool:
    if "use_cache" in signature.parameters and arguments.get("use_cache") is None:
        arguments["use_cache"] = False
        return True
    return False


def _global_positions(arguments: Dict[str, Any], lc: LongContext, tokens: Optional[torch.Tensor]) -> bool:
    if arguments.get("position_ids") is not None or tokens is None:
        return False
    local, sp = tokens.shape[1], lc.topology.sp
    lc.config.check_seq_len(local * sp, what=f"global sequence length (local {local} x sp {sp})")
    arguments["position_ids"] = lc.positions(local * sp, device=tokens.device).unsqueeze(0)
    return True


def prepare_call(model: torch.nn.Module, args, kwargs):
    """Forward pre-hook (``with_kwargs=True``): the jobs of the module docstring, in order; returns the
    rebuilt ``(args, kwargs)`` when anything changed."""
    lc = long_context_of(model)
    set_request(model, None)
    # "auto" values resolve at the first batch through shard_batch; a batch that skipped it has no length to
    # resolve them from here that every rank would agree on (each sees only its shard)
    lc.config.require_resolved()
    configure_layers(model, lc)
    if lc.checkpoint_offload is not None:
        lc.checkpoint_offload.begin_forward()
    if lc.layer_inputs is not None:
        lc.layer_inputs.begin_forward()
    signature = inspect.signature(model.forward)
    arguments = _bind(signature, args, kwargs)
    if arguments is None:
        return None  # leave the call as it is
    _refuse_attention_mask(arguments)
    request = loss_request(model, lc, signature, arguments)
    tokens = _tokens(arguments)
    changed = request is not None
    changed |= _documents_once(arguments, lc, tokens)
    changed |= _cache_off(arguments, signature)
    changed |= _global_positions(arguments, lc, tokens)
    set_request(model, request)
    return ((), arguments) if changed else None


__all__ = ["prepare_call"]
