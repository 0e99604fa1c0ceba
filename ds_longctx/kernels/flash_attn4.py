"""FlashAttention-4 (``flash_attn.cute``, CuTe DSL; Hopper and Blackwell), with native GQA.

``_flash_attn_fwd(..., return_lse=True)`` gives ``lse [B, H, S]`` float32 and ``_flash_attn_bwd`` takes the
final out/lse. Kernels are compiled on first use per shape/dtype (seconds), then cached.
"""
from __future__ import annotations

import torch

from .base import Kernel


def _interface():
    try:
        from flash_attn.cute import interface  # type: ignore
    except Exception:  # noqa: BLE001 - absent or broken install: not available
        return None
    return interface


class FlashAttn4Kernel(Kernel):
    name = "flash_attn4"

    def available(self) -> bool:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
            return False
        return _interface() is not None

    def supports(self, q, k):
        if q.device.type != "cuda":
            return "FlashAttention-4 runs on CUDA"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"FlashAttention-4 takes fp16/bf16, inputs are {q.dtype}"
        if q.shape[-1] not in (64, 96, 128):
            return "FlashAttention-4 is used here for head_dim 64, 96 or 128"
        return None

    def forward(self, q, k, v, causal, scale):
        res = _interface()._flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(),
                                           softmax_scale=scale, causal=causal, return_lse=True)
        return res[0], res[1]

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        res = _interface()._flash_attn_bwd(q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
                                           dout.contiguous(), lse.contiguous(), scale, causal)
        return res[0], res[1], res[2]
