"""Rotary position embedding as compiled kernels for transformers' attention modules (``fused_rope``).

transformers' Llama, Qwen2, Qwen3 and Mistral attention modules rotate queries and keys with their modeling
module's ``apply_rotary_pos_emb``: ``q * cos + rotate_half(q) * sin`` in five eager passes over each of q and k
forward (``rotate_half`` builds a new tensor through a slice, a negation and a concatenation) and as many
backward, each rounding to bf16. :func:`rotary` does each direction in one compiled kernel per tensor, in
fp32, rounding once; it keeps only ``cos`` and ``sin`` for backward (as the eager ops do), and its outputs
keep their inputs' memory layout, so the attention after it copies nothing.

The modeling module's function is looked up at call time, so :func:`fuse_rotary` puts a dispatcher there
(once per modeling module) that runs :func:`rotary` only inside the forward of an attention module it
switched on (its recomputation in a checkpointed backward included), on the calling thread; every other
call, other models' in the process included, runs the original function unchanged.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, Optional, Tuple

import torch

from ..memory.compiled import compiled

ROTARY_ATTENTION_CLASSES = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention")
_FUNCTION = "apply_rotary_pos_emb"
_ORIGINAL_ATTR = "_ds_longctx_original"
_FORWARD_ATTR = "_ds_longctx_rotary_forward"


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, rotate_half(x) = ``[-x2, x1]`` of the last dimension's halves."""
    w, c, s = _wide(x), _wide(cos), _wide(sin)
    half = w.shape[-1] // 2
    rotated = torch.cat((-w[..., half:], w[..., :half]), dim=-1)
    return (w * c + rotated * s).to(x.dtype)


def _rotate_back(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`_rotate` with respect to ``x``: ``g * cos + rotate_half^T(g * sin)``, where
    rotate_half^T(y) = ``[y2, -y1]``."""
    g, c, s = _wide(grad), _wide(cos), _wide(sin)
    gs = g * s
    half = g.shape[-1] // 2
    return (g * c + torch.cat((gs[..., half:], -gs[..., :half]), dim=-1)).to(grad.dtype)


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B, S, H, D]`` (a view): the layout the projections wrote, so that compiled
    kernels read and write it contiguously."""
    return x.transpose(1, 2)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        # cos/sin [B, S, D] -> [B, S, 1, D] against [B, S, H, D]
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        ctx.save_for_backward(c, s)
        kernel = compiled(_rotate)
        return (_heads_last(kernel(_heads_last(q), c, s)), _heads_last(kernel(_heads_last(k), c, s)))

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        c, s = ctx.saved_tensors
        kernel = compiled(_rotate_back)
        dq = None if grad_q is None else _heads_last(kernel(_heads_last(grad_q), c, s))
        dk = None if grad_k is None else _heads_last(kernel(_heads_last(grad_k), c, s))
        return dq, dk, None, None


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """Rotary embedding of ``q`` ``[B, H, S, D]`` and ``k`` ``[B, Hkv, S, D]`` by ``cos``/``sin`` ``[B, S, D]``
    (transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``) in compiled kernels; returns the rotated
    q and k in their dtypes and layouts. ``cos``/``sin`` get no gradient."""
    if cos.shape != sin.shape or cos.dim() != 3 or q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rotary: q {tuple(q.shape)}, k {tuple(k.shape)} must be [B, H, S, D] and cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)} [B, S, D]")
    return _Rotary.apply(q, k, cos, sin)


_ACTIVE = threading.local()


def _inside_switched_forward() -> bool:
    return getattr(_ACTIVE, "depth", 0) > 0


def _dispatcher(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if len(args) == 1 else 1)
        plain = len(args) <= 1 and set(kwargs) <= {"unsqueeze_dim"} and unsqueeze_dim == 1
        if plain and _inside_switched_forward() and not (cos.requires_grad or sin.requires_grad) \
                and cos.dim() == 3:
            return rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _ORIGINAL_ATTR, original)
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


class RotaryFusedForward:
    """An attention module's ``forward`` under which its modeling module's ``apply_rotary_pos_emb`` runs
    :func:`rotary` (see :func:`fuse_rotary`)."""

    def __init__(self, forward: Callable):
        self.forward = forward
        self.enabled = True

    def __call__(self, *args, **kwargs):
        if not self.enabled:  # switched off under a wrapper set after it: passes the call through
            return self.forward(*args, **kwargs)
        _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1
        try:
            return self.forward(*args, **kwargs)
        finally:
            _ACTIVE.depth -= 1


def _modeling_module(module: torch.nn.Module):
    return sys.modules.get(type(module).__module__)


def is_rotary_attention(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of transformers' attention modules that rotate q and k with their modeling
    module's ``apply_rotary_pos_emb``."""
    modeling = _modeling_module(module)
    return (type(module).__name__ in ROTARY_ATTENTION_CLASSES and modeling is not None
            and callable(getattr(modeling, _FUNCTION, None)))


def _install_dispatcher(modeling) -> None:
    current = getattr(modeling, _FUNCTION)
    if getattr(current, _ORIGINAL_ATTR, None) is None:
        setattr(modeling, _FUNCTION, _dispatcher(current))


def fuse_rotary(model: torch.nn.Module, enabled: bool = True) -> int:
    """Rotate q and k with :func:`rotary` in every rotary attention module of ``model`` (``enabled=False``:
    back to the models' own function). Returns the number of modules switched on now."""
    n = 0
    for module in model.modules():
        if not is_rotary_attention(module):
            continue
        switched: Optional[RotaryFusedForward] = module.__dict__.get(_FORWARD_ATTR)
        if enabled and switched is None:
            _install_dispatcher(_modeling_module(module))
            switched = RotaryFusedForward(module.forward)
            object.__setattr__(module, _FORWARD_ATTR, switched)
            module.forward = switched
            n += 1
        elif not enabled and switched is not None:
            del module.__dict__[_FORWARD_ATTR]
            switched.enabled = False
            if module.__dict__.get("forward") is switched:  # a wrapper set after ours stays, passing through
                module.forward = switched.forward
                if getattr(switched.forward, "__self__", None) is module:  # the class's own: no instance entry
                    del module.forward
    return n


__all__ = ["ROTARY_ATTENTION_CLASSES", "RotaryFusedForward", "fuse_rotary", "is_rotary_attention", "rotary"]
