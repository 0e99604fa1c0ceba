"""A SiLU-gated MLP (``down(silu(gate(x)) * up(x))``: Llama, Qwen2, Qwen3, Mistral) whose gating runs as compiled
kernels and keeps less for backward.

transformers runs the gating as two eager ops: ``silu`` (it keeps its input, ``gate``) and the product (it keeps
both factors, ``silu(gate)`` and ``up``): three ``[S_local, intermediate]`` activations kept, about five passes over
such a tensor forward and eight backward (fp32 temporaries of the ``silu`` backward included). :func:`swiglu`
keeps ``gate`` and ``up`` only and computes forward and backward as ``torch.compile``d functions: one kernel reads
both factors and writes the product; one reads them with the upstream gradient and writes both gradients.
Values may differ from the eager path's by one bf16 rounding step (the product is rounded once, not twice).
"""
from __future__ import annotations

import torch

from .compiled import compiled
from .tiling import set_base_forward

GATED_MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision the kernels compute in: fp32, or its own where that is wider."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _forward_kernel(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(_wide(gate)) * _wide(up)).to(up.dtype)


def _backward_kernel(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    g, u, dy = _wide(gate), _wide(up), _wide(grad)
    sig = torch.sigmoid(g)
    d_up = dy * g * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    d_gate = dy * u * sig * (1 + g * (1 - sig))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return compiled(_forward_kernel)(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return compiled(_backward_kernel)(gate, up, grad.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` keeping only ``gate`` and ``up`` for backward, in compiled kernels.

    ``gate``, ``up``: ``[..., intermediate]`` of one dtype; returns ``[..., intermediate]`` in it.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must agree")
    return _SwiGLU.apply(gate, up)


class FusedGatedMLPForward:
    """A gated MLP's ``forward`` with :func:`swiglu` for its gating (see :func:`fuse_gated_mlps`)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return m.down_proj(swiglu(m.gate_proj(x), m.up_proj(x)))


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of transformers' MLPs computing ``down(silu(gate(x)) * up(x))``."""
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return type(module).__name__ in GATED_MLP_CLASSES and silu and all(
        isinstance(getattr(module, name, None), torch.nn.Linear) for name in ("gate_proj", "up_proj", "down_proj"))


def fuse_gated_mlps(model: torch.nn.Module, enabled: bool = True) -> int:
    """Switch every gated MLP of ``model`` to :class:`FusedGatedMLPForward` (``enabled=False``: back to its own
    forward); a tiled MLP's tiles run it too. Returns the number of MLPs switched on now."""
    n = 0
    for module in model.modules():
        if is_gated_mlp(module):
            set_base_forward(module, FusedGatedMLPForward(module) if enabled else None)
            n += 1 if enabled else 0
    return n


__all__ = ["FusedGatedMLPForward", "GATED_MLP_CLASSES", "fuse_gated_mlps", "is_gated_mlp", "swiglu"]
