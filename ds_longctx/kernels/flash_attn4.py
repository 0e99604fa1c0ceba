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

    def __init__(self):
        self._cu_cache = {}

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

    # Packed documents: one launch for all segments, the batch rows flattened into more segments.

    def _offsets(self, cu_q, cu_k, B, Tq, Tk, device):
        key = (tuple(cu_q), tuple(cu_k), B, Tq, Tk, device)
        hit = self._cu_cache.get(key)
        if hit is None:
            flat = lambda cu, T: [b * T + c for b in range(B) for c in cu[:-1]] + [B * T]  # noqa: E731
            longest = lambda cu: max(b - a for a, b in zip(cu, cu[1:]))  # noqa: E731
            hit = (torch.tensor(flat(cu_q, Tq), dtype=torch.int32, device=device),
                   torch.tensor(flat(cu_k, Tk), dtype=torch.int32, device=device), longest(cu_q), longest(cu_k))
            if len(self._cu_cache) >= 256:  # a forward and its backward share an entry; keep the map small
                self._cu_cache.clear()
            self._cu_cache[key] = hit
        return hit

    def forward_varlen(self, q, k, v, cu_q, cu_k, causal, scale):
        B, Tq, H, D = q.shape
        Tk, Hkv = k.shape[1], k.shape[2]
        cq, ck, mq, mk = self._offsets(cu_q, cu_k, B, Tq, Tk, q.device)
        res = _interface()._flash_attn_fwd(q.contiguous().view(B * Tq, H, D), k.contiguous().view(B * Tk, Hkv, D),
                                           v.contiguous().view(B * Tk, Hkv, D), cu_seqlens_q=cq, cu_seqlens_k=ck,
                                           max_seqlen_q=mq, max_seqlen_k=mk, softmax_scale=scale, causal=causal,
                                           return_lse=True)
        # lse comes as [H, B * Tq]
        return res[0].view(B, Tq, H, D), res[1].view(H, B, Tq).transpose(0, 1)

    def backward_varlen(self, dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        B, Tq, H, D = q.shape
        Tk, Hkv = k.shape[1], k.shape[2]
        cq, ck, mq, mk = self._offsets(cu_q, cu_k, B, Tq, Tk, q.device)
        flat_q = lambda t: t.contiguous().view(B * Tq, H, D)  # noqa: E731
        flat_k = lambda t: t.contiguous().view(B * Tk, Hkv, D)  # noqa: E731
        res = _interface()._flash_attn_bwd(flat_q(q), flat_k(k), flat_k(v), flat_q(out), flat_q(dout),
                                           lse.transpose(0, 1).reshape(H, B * Tq).contiguous(), scale, causal,
                                           cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)
        return res[0].view(B, Tq, H, D), res[1].view(B, Tk, Hkv, D), res[2].view(B, Tk, Hkv, D)
