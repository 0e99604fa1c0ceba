"""The one small interface every local attention kernel implements.

Layout conventions shared by all kernels:
    q:   [B, Sq, H, D]
    k,v: [B, Sk, Hkv, D]  with H % Hkv == 0 (GQA/MQA: query head h reads kv head h // (H // Hkv))
    out: [B, Sq, H, D]    in q's dtype
    lse: [B, H, Sq]       float32 log-sum-exp of the scaled scores (natural log)
``causal=True`` is only asked for with ``Sq == Sk`` (the diagonal block of a schedule): the distributed
schedules split every other block into fully visible or invisible pieces.
Backward takes the *final* ``out`` and ``lse`` of the whole (merged) attention, so a kernel's block
gradients sum to the exact gradient across blocks.

Packed documents use the varlen pair: segment ``i`` of the query rows, ``[cu_q[i], cu_q[i + 1])``, attends
to segment ``i`` of the key rows, ``[cu_k[i], cu_k[i + 1])`` (``causal``: equal lengths, the diagonal).
The base class runs one ``forward``/``backward`` per segment; kernels with a varlen API (FlashAttention-4)
run all segments in one launch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


class Kernel:
    """A local attention kernel: ``forward -> (out, lse)`` and ``backward -> (dq, dk, dv)``."""

    name: str = "base"

    def available(self) -> bool:  # pragma: no cover - overridden
        """Whether this kernel can run in this process (library installed, device present)."""
        raise NotImplementedError

    def supports(self, q: Tensor, k: Tensor) -> Optional[str]:
        """``None`` if the kernel handles these inputs, else the reason it does not."""
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 causal: bool, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Sequence[int], cu_k: Sequence[int],
                       causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
        """Segments of ``q`` ``[B, Tq, H, D]`` against segments of ``k``/``v`` ``[B, Tk, Hkv, D]`` (``cu_q``,
        ``cu_k``: segment offsets, host integers, ``cu[0] = 0``, ``cu[-1] = T``) -> ``(out, lse)`` as forward."""
        out = torch.empty_like(q)
        lse = None
        for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
            o, l_ = self.forward(q[:, a:b], k[:, c:d], v[:, c:d], causal, scale)
            if lse is None:
                lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=l_.dtype, device=q.device)
            out[:, a:b], lse[:, :, a:b] = o, l_
        return out, lse

    def backward_varlen(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        cu_q: Sequence[int], cu_k: Sequence[int], causal: bool,
                        scale: float) -> Tuple[Tensor, Tensor, Tensor]:
        """Gradients of :meth:`forward_varlen` for the final ``out``/``lse``; shaped like ``(q, k, v)``."""
        grads = None
        for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
            g = self.backward(dout[:, a:b], q[:, a:b], k[:, c:d], v[:, c:d], out[:, a:b], lse[:, :, a:b],
                              causal, scale)
            if grads is None:
                grads = [torch.zeros(t.shape, dtype=x.dtype, device=x.device) for t, x in zip((q, k, v), g)]
            grads[0][:, a:b], grads[1][:, c:d], grads[2][:, c:d] = g
        return tuple(grads)

    def __repr__(self) -> str:
        return f"<kernel {self.name}>"


def expand_kv(x: Tensor, n_heads: int) -> Tensor:
    """``[B, S, Hkv, D] -> [B, S, H, D]`` for kernels without native GQA (a local view-copy, never sent)."""
    hkv = x.shape[2]
    if hkv == n_heads:
        return x
    return x.repeat_interleave(n_heads // hkv, dim=2)


def reduce_kv(grad: Tensor, n_kv_heads: int) -> Tensor:
    """Adjoint of :func:`expand_kv`: ``[B, S, H, D] -> [B, S, Hkv, D]`` summing each group's heads."""
    b, s, h, d = grad.shape
    if h == n_kv_heads:
        return grad
    return grad.view(b, s, n_kv_heads, h // n_kv_heads, d).sum(dim=3)


class MappedKVKernel(Kernel):
    """A kernel whose query head ``h`` reads kv head ``index[h]``, for head maps that are not a uniform
    GQA ratio (uneven Ulysses splits). K/V are gathered to the query heads locally, right before the
    kernel; their gradients are summed back per kv head."""

    def __init__(self, inner: Kernel, index: torch.Tensor):
        self.inner = inner
        self.index = index
        self.name = f"{inner.name}+mapped_kv"

    def available(self) -> bool:
        return self.inner.available()

    def _index(self, k):
        if self.index.device != k.device:
            self.index = self.index.to(k.device)
        return self.index

    def forward(self, q, k, v, causal, scale):
        idx = self._index(k)
        return self.inner.forward(q, k.index_select(2, idx), v.index_select(2, idx), causal, scale)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        idx = self._index(k)
        dq, dk, dv = self.inner.backward(dout, q, k.index_select(2, idx), v.index_select(2, idx), out, lse,
                                         causal, scale)
        dk = torch.zeros(k.shape, dtype=dk.dtype, device=dk.device).index_add_(2, idx, dk)
        dv = torch.zeros(v.shape, dtype=dv.dtype, device=dv.device).index_add_(2, idx, dv)
        return dq, dk, dv

    def forward_varlen(self, q, k, v, cu_q, cu_k, causal, scale):
        idx = self._index(k)
        return self.inner.forward_varlen(q, k.index_select(2, idx), v.index_select(2, idx), cu_q, cu_k, causal,
                                         scale)

    def backward_varlen(self, dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        idx = self._index(k)
        dq, dk, dv = self.inner.backward_varlen(dout, q, k.index_select(2, idx), v.index_select(2, idx), out, lse,
                                                cu_q, cu_k, causal, scale)
        dk = torch.zeros(k.shape, dtype=dk.dtype, device=dk.device).index_add_(2, idx, dk)
        dv = torch.zeros(v.shape, dtype=dv.dtype, device=dv.device).index_add_(2, idx, dv)
        return dq, dk, dv
