"""Jobs measuring FPDT chunked attention's live device buffers (tests/test_geometry.py), run in one process
or on every rank of a gloo pool."""
from __future__ import annotations

import torch

from ds_longctx.attention.chunked import chunked_attention
from ds_longctx.attention.ulysses import UlyssesPlan
from ds_longctx.kernels.reference import ReferenceKernel
from ds_longctx.layout import shard
from ds_longctx.memory import HostPool
from ds_longctx.topology import Topology
from tests.dist_cases import topology
from tests.live_memory import LiveTensors, OpaqueKernel


def measured_working_set(ulysses, ring, *, batch, seq_len, heads, kv_heads, head_dim, chunk_size, offload,
                         dtype=torch.bfloat16):
    """``(forward, backward)`` peak bytes of the buffers one call of chunked attention holds beside its
    inputs (q, k, v, dout), its outputs (out, dq, dk, dv) and the host pool's buffers: bf16 inputs, as on a
    GPU, through a kernel whose workspace is hidden; the backward's peak includes what the forward kept. The call runs twice, the second measured (a warm pool)."""
    topo = Topology() if ulysses * ring == 1 else topology(ulysses, ring)
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(batch, seq_len, h, head_dim, generator=gen) for h in (heads, kv_heads, kv_heads, heads)]
    local = [shard(t, topo, chunk_size=chunk_size).to(dtype).contiguous() for t in full]
    plan = UlyssesPlan(heads, kv_heads, topo.ulysses, topo.ulysses_rank)
    pool = HostPool()
    peaks = None
    for _ in range(2):
        tracker = LiveTensors()
        kernel = OpaqueKernel(plan.local_kernel(ReferenceKernel()), tracker)
        q, k, v = (t.detach().requires_grad_() for t in local[:3])
        dout = local[3]
        allocations = pool.allocations
        with tracker:
            out = chunked_attention(q, k, v, topo, kernel=kernel, q_ranges=plan.q_ranges, kv_ranges=plan.kv_ranges,
                                    causal=True, scale=head_dim ** -0.5, chunk_size=chunk_size, offload=offload,
                                    pool=pool)
        forward, kept = tracker.peak(excluding=[out]), tracker.live(excluding=[out])
        tracker = LiveTensors()
        kernel.tracker = tracker
        with tracker:
            out.backward(dout)
        # what the forward kept is held until the backward's end, beside what the backward allocates
        backward = kept + tracker.peak(excluding=[q.grad, k.grad, v.grad])
        peaks = (forward, backward, pool.allocations - allocations)
    pool.release()
    return peaks


def measured_working_sets(ulysses, ring, configs):
    """:func:`measured_working_set` for each config ``(batch, seq_len, heads, kv_heads, head_dim, chunk_size,
    offload)`` on this rank (one job for the pool)."""
    return [measured_working_set(ulysses, ring, batch=b, seq_len=s, heads=h, kv_heads=hk, head_dim=d, chunk_size=c,
                                 offload=o) for b, s, h, hk, d, c, o in configs]
