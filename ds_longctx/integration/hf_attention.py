"""The transformers attention function: :func:`hf_attention`, registered as ``"ds_longctx"``.

transformers' attention modules (Llama, Qwen2/Qwen3, Mistral, ...) call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, scaling=..., **kwargs)``. The
run's :class:`~ds_longctx.integration.context.LongContext` rides on the modules themselves (the registry is
global, a run's process groups are not), so two models in one process may use different topologies.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..attention.documents import Documents
from .context import long_context_of

ATTN_IMPLEMENTATION = "ds_longctx"


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




__all__ = ["ATTN_IMPLEMENTATION", "HFModelError", "hf_attention", "register"]
