"""Kernels behind torch SDPA's private ops, which expose the log-sum-exp the ring merge needs.

The public ``scaled_dot_product_attention`` hides the lse; its backends' aten ops return it and take the
final (merged) ``out``/``lse`` in backward. Undefined optional tensors are passed as ``None``. None of
these ops takes GQA K/V, so K/V are expanded locally right before the call (after all communication).
"""
from __future__ import annotations

import torch

from .base import Kernel, expand_kv, reduce_kv

aten = torch.ops.aten


def _bhsd(x):
    """``[B, S, H, D]`` -> ``[B, H, S, D]`` view (the ops read strided inputs)."""
    return x.transpose(1, 2)


class _SDPAKernel(Kernel):
    device_type = "cuda"
    dtypes = (torch.float16, torch.bfloat16)

    def available(self) -> bool:
        if self.device_type == "cuda":
            return torch.cuda.is_available()
        return True

    def supports(self, q, k):
        if q.device.type != self.device_type:
            return f"{self.name} runs on {self.device_type}, inputs are on {q.device.type}"
        if q.dtype not in self.dtypes:
            return f"{self.name} takes {self.dtypes}, inputs are {q.dtype}"
        return None


class CudnnKernel(_SDPAKernel):
    """``aten._scaled_dot_product_cudnn_attention`` (cuDNN fused flash attention, Hopper-tuned)."""

    name = "sdpa_cudnn"

    def supports(self, q, k):
        why = super().supports(q, k)
        if why is None and q.shape[-1] > 128:
            return "cuDNN attention takes head_dim <= 128"
        return why

    def forward(self, q, k, v, causal, scale):
        H = q.shape[2]
        res = aten._scaled_dot_product_cudnn_attention(
            _bhsd(q), _bhsd(expand_kv(k, H)), _bhsd(expand_kv(v, H)), None, True, 0.0, causal, False,
            scale=scale)
        out, lse = res[0], res[1]
        return out.transpose(1, 2), lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        H, Hkv = q.shape[2], k.shape[2]
        Sq, Sk = q.shape[1], k.shape[1]
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        # cuDNN wants dout laid out like out; both are [B, S, H, D]-contiguous here.
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            _bhsd(dout.contiguous()), _bhsd(q), _bhsd(expand_kv(k, H)), _bhsd(expand_kv(v, H)),
            _bhsd(out.contiguous()), lse.unsqueeze(-1).contiguous(), empty, empty, None, None, None,
            Sq, Sk, 0.0, causal, scale=scale)
        return (dq.transpose(1, 2), reduce_kv(dk.transpose(1, 2), Hkv), reduce_kv(dv.transpose(1, 2), Hkv))


class FlashKernel(_SDPAKernel):
    """``aten._scaled_dot_product_flash_attention`` (torch's bundled FlashAttention-2)."""

    name = "sdpa_flash"

    def forward(self, q, k, v, causal, scale):
        H = q.shape[2]
        res = aten._scaled_dot_product_flash_attention(
            _bhsd(q), _bhsd(expand_kv(k, H)), _bhsd(expand_kv(v, H)), 0.0, causal, False, scale=scale)
        return res[0].transpose(1, 2), res[1]

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        H, Hkv = q.shape[2], k.shape[2]
        Sq, Sk = q.shape[1], k.shape[1]
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            _bhsd(dout.contiguous()), _bhsd(q), _bhsd(expand_kv(k, H)), _bhsd(expand_kv(v, H)),
            _bhsd(out.contiguous()), lse.contiguous(), None, None, Sq, Sk, 0.0, causal, empty, empty,
            scale=scale)
        return (dq.transpose(1, 2), reduce_kv(dk.transpose(1, 2), Hkv), reduce_kv(dv.transpose(1, 2), Hkv))


class CPUFlashKernel(_SDPAKernel):
    """``aten._scaled_dot_product_flash_attention_for_cpu``: the fused CPU kernel."""

    name = "sdpa_cpu_flash"
    device_type = "cpu"
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def forward(self, q, k, v, causal, scale):
        H = q.shape[2]
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q), _bhsd(expand_kv(k, H)), _bhsd(expand_kv(v, H)), 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        H, Hkv = q.shape[2], k.shape[2]
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout), _bhsd(q), _bhsd(expand_kv(k, H)), _bhsd(expand_kv(v, H)), _bhsd(out),
            lse.to(torch.float32) if q.dtype != torch.float64 else lse, 0.0, causal, scale=scale)
        return (dq.transpose(1, 2), reduce_kv(dk.transpose(1, 2), Hkv), reduce_kv(dv.transpose(1, 2), Hkv))
