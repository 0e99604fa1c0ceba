"""FlashAttention-2 (the ``flash-attn`` package, >= 2.6 internal API), with native GQA.

Its internal forward returns the lse (``[B, H, S]`` float32) and its backward takes the final out/lse,
which is what the ring needs. The package compiles CUDA for hours, so the lent GPU machines do not have it;
this backend is exercised wherever it is installed (tests/test_kernels.py compares it with the reference).
"""
from __future__ import annotations

import inspect

import torch

from .base import Kernel


def _interface():
    try:
        from flash_attn import flash_attn_interface as fai  # type: ignore
    except Exception:  # noqa: BLE001 - absent or broken install: not available
        return None
    fwd = getattr(fai, "_flash_attn_forward", None)
    if fwd is None or "window_size_left" not in inspect.signature(fwd).parameters:
        return None  # older than 2.6 (different signature) or FlashAttention-3/4's namespace
    return fai


class FlashAttn2Kernel(Kernel):
    name = "flash_attn"

    def available(self) -> bool:
        return torch.cuda.is_available() and _interface() is not None

    def supports(self, q, k):
        if q.device.type != "cuda":
            return "flash-attn runs on CUDA"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn takes fp16/bf16, inputs are {q.dtype}"
        if q.shape[-1] % 8 != 0 or q.shape[-1] > 256:
            return "flash-attn takes head_dim a multiple of 8, at most 256"
        return None

    def forward(self, q, k, v, causal, scale):
        fai = _interface()
        out, lse, _, _ = fai._flash_attn_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), 0.0, scale, causal, -1, -1, 0.0, None, False)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        fai = _interface()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fai._flash_attn_backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                 out.contiguous(), lse.contiguous(), dq, dk, dv, 0.0, scale, causal, -1, -1,
                                 0.0, None, False, None)
        return dq, dk, dv
