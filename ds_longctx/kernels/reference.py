"""Pure-torch attention kernel: the CPU path and the numerical reference of every other kernel.

Accumulates in float32 (float64 for float64 inputs) and tiles over query blocks so that its memory is
``O(block * Sk)`` per head instead of ``O(Sq * Sk)``. GQA is handled by grouping query heads, never by
copying K/V.
"""
from __future__ import annotations

import torch

from .base import Kernel


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ReferenceKernel(Kernel):
    name = "reference"

    def __init__(self, block_q: int = 1024):
        self.block_q = block_q

    def available(self) -> bool:
        return True

    def _scores(self, q_blk, k, causal, q0, scale):
        # q_blk [B, bq, Hkv, g, D], k [B, Sk, Hkv, D] -> [B, Hkv, g, bq, Sk]
        s = torch.einsum("bqhgd,bshd->bhgqs", q_blk, k) * scale
        if causal:
            bq, sk = q_blk.shape[1], k.shape[1]
            rows = torch.arange(q0, q0 + bq, device=s.device)[:, None]
            cols = torch.arange(sk, device=s.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        return s

    def forward(self, q, k, v, causal, scale):
        B, Sq, H, D = q.shape
        Hkv = k.shape[2]
        acc = _acc_dtype(q.dtype)
        qg = q.to(acc).view(B, Sq, Hkv, H // Hkv, D)
        kf, vf = k.to(acc), v.to(acc)
        out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, Sq, dtype=acc, device=q.device)
        for q0 in range(0, Sq, self.block_q):
            q1 = min(Sq, q0 + self.block_q)
            s = self._scores(qg[:, q0:q1], kf, causal, q0, scale)
            m = torch.logsumexp(s, dim=-1)                      # [B, Hkv, g, bq]
            p = torch.exp(s - m[..., None])
            o = torch.einsum("bhgqs,bshd->bqhgd", p, vf)
            out[:, q0:q1] = o.reshape(B, q1 - q0, H, D).to(q.dtype)
            lse[:, :, q0:q1] = m.reshape(B, H, q1 - q0)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        B, Sq, H, D = q.shape
        Hkv = k.shape[2]
        g = H // Hkv
        acc = _acc_dtype(q.dtype)
        qg = q.to(acc).view(B, Sq, Hkv, g, D)
        dog = dout.to(acc).view(B, Sq, Hkv, g, D)
        kf, vf = k.to(acc), v.to(acc)
        lse_g = lse.to(acc).view(B, Hkv, g, Sq)
        delta = (dout.to(acc) * out.to(acc)).sum(-1).view(B, Sq, Hkv, g).permute(0, 2, 3, 1)  # [B,Hkv,g,Sq]
        dq = torch.empty(B, Sq, H, D, dtype=acc, device=q.device)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        for q0 in range(0, Sq, self.block_q):
            q1 = min(Sq, q0 + self.block_q)
            s = self._scores(qg[:, q0:q1], kf, causal, q0, scale)
            p = torch.exp(s - lse_g[..., q0:q1, None])
            do = dog[:, q0:q1]
            dv += torch.einsum("bhgqs,bqhgd->bshd", p, do)
            dp = torch.einsum("bqhgd,bshd->bhgqs", do, vf)
            ds = p * (dp - delta[..., q0:q1, None])
            dq[:, q0:q1] = (torch.einsum("bhgqs,bshd->bqhgd", ds, kf) * scale).reshape(B, q1 - q0, H, D)
            dk += torch.einsum("bhgqs,bqhgd->bshd", ds, qg[:, q0:q1]) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
