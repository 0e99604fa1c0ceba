"""RMSNorm that keeps only its input and ``1/rms`` for backward.

transformers' RMSNorm (Llama, Qwen2, Qwen3, Mistral) computes in fp32 and autograd keeps what each op
needs: the fp32 copy of the input (twice the size of a bf16 activation) and the normalized bf16 tensor
before the weight. At long sequence that is three ``[S_local, hidden]`` activations per norm, two norms a
layer, all alive while a checkpointed layer runs its backward (at 512K tokens and hidden 4096: 24 GiB).
:func:`rms_norm` keeps the input, which the layer holds anyway, and ``1/rms`` (one fp32 per token), and
computes forward and backward over tiles of rows, so the fp32 temporaries exist one tile at a time.

The forward runs transformers' operations in their order on each row, so its output equals the module's;
the gradient is the same function computed in another order (fp32, rounding apart).

``fused=True`` runs each tile's forward and backward as ``torch.compile``d functions: one kernel reads the
tile and writes the output (eager: about nine passes over it, fp32 temporaries included), the backward two;
the first call of each compiles it. Its rounding may differ from the eager path's by one bf16 step.
"""
from __future__ import annotations

from typing import Optional

import torch

from .compiled import compiled

# Rows (tokens x heads for per-head norms) per tile: the fp32 temporaries of a tile at hidden 4096 take
# 128 MiB each, small beside a layer, large enough that a launch per tile costs nothing.
TILE_ROWS = 8192

# transformers' norms whose forward is exactly LlamaRMSNorm's (tests compare them with this code)
RMS_NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")


def _tiles(n: int, rows: int):
    return (slice(a, min(a + rows, n)) for a in range(0, n, rows))


def _forward_tile(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, rstd: torch.Tensor) -> None:
    """``out = weight * cast(x * 1/rms(x))``, ``rstd = 1/rms(x)`` for ``[rows, hidden]`` ``x`` (in place)."""
    h = x.to(torch.float32)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    torch.mul(weight, (h * r).to(x.dtype), out=out)
    rstd.copy_(r)


def _backward_tile(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                   dx: Optional[torch.Tensor], dw: Optional[torch.Tensor]) -> None:
    """The gradients of a tile, in place: ``dx`` written, ``dw`` (fp32 ``[hidden]``) accumulated (None: not
    needed, e.g. a frozen weight)."""
    h = x.to(torch.float32) * rstd
    if dw is not None:  # y = w * cast(h): dw sums g * cast(h) over the rows
        dw.add_((g.to(torch.float32) * h.to(x.dtype).to(torch.float32)).sum(0))
    if dx is not None:
        # through the cast (the grad of cast(h) is g * w in the output dtype), then h = x * rstd(x):
        # dx = rstd * (gh - h * mean(gh * h))
        gh = (g * weight).to(torch.float32)
        dx.copy_(rstd * (gh - h * (gh * h).mean(-1, keepdim=True)))


def _tile_functions(fused: bool):
    """The forward and backward of a tile: eager, or compiled."""
    if not fused:
        return _forward_tile, _backward_tile
    return compiled(_forward_tile), compiled(_backward_tile)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, tile_rows, fused):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.empty(x2.shape, dtype=torch.result_type(weight, x2), device=x.device)
        rstd = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
        forward_tile, _ = _tile_functions(fused)
        for sl in _tiles(x2.shape[0], tile_rows):
            forward_tile(x2[sl], weight, eps, out[sl], rstd[sl])
        ctx.save_for_backward(x, weight, rstd)
        ctx.tile_rows, ctx.fused = tile_rows, fused
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(x2) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        _, backward_tile = _tile_functions(ctx.fused)
        for sl in _tiles(x2.shape[0], ctx.tile_rows):
            backward_tile(x2[sl], g2[sl], weight, rstd[sl], None if dx is None else dx[sl], dw)
        return (None if dx is None else dx.view_as(x), None if dw is None else dw.to(weight.dtype), None, None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, tile_rows: int = TILE_ROWS,
             fused: bool = False) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype)``, as transformers' RMSNorm,
    keeping only ``x`` and ``1/rms`` for backward; ``fused``: each tile in compiled kernels (module docstring).

    ``x``: ``[..., hidden]``; ``weight``: ``[hidden]``; returns ``[..., hidden]``.
    """
    if tile_rows < 1:
        raise ValueError(f"tile_rows must be positive, got {tile_rows}")
    return _RMSNorm.apply(x, weight, eps, tile_rows, fused)


class LeanRMSNormForward:
    """A transformers RMSNorm's ``forward`` replaced by :func:`rms_norm` (see :func:`lean_rms_norms`)."""

    def __init__(self, module: torch.nn.Module, fused: bool = False):
        self.module = module
        self.fused = fused

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        m = self.module
        return rms_norm(hidden_states, m.weight, m.variance_epsilon, fused=self.fused)


def is_rms_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of transformers' RMSNorms that :func:`rms_norm` computes."""
    return (type(module).__name__ in RMS_NORM_CLASSES and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def lean_rms_norms(model: torch.nn.Module, enabled: bool = True, fused: bool = False) -> int:
    """Switch every transformers RMSNorm in ``model`` to :func:`rms_norm` (``enabled=False``: back to its own
    forward; ``fused``: compiled tiles). Returns the number of norms switched on now."""
    n = 0
    for module in model.modules():
        if not is_rms_norm(module):
            continue
        if isinstance(module.__dict__.get("forward"), LeanRMSNormForward):
            del module.forward
        if enabled:
            module.forward = LeanRMSNormForward(module, fused)
            n += 1
    return n


__all__ = ["LeanRMSNormForward", "RMS_NORM_CLASSES", "TILE_ROWS", "is_rms_norm", "lean_rms_norms", "rms_norm"]
