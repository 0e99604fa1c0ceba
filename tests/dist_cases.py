"""Jobs the gloo worker ranks run (module-level so that they pickle by name).

Every job draws its full-sequence inputs from a seed, so all ranks of a sequence-parallel group hold the
same global tensors (data-parallel replicas draw different ones), runs the distributed path on its shard,
and compares the gathered result with a single-process float64 reference computed on the spot.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ds_longctx.attention import attention
from ds_longctx.layout import shard, unshard
from ds_longctx.topology import Topology

_TOPOLOGIES = {}


def topology(ulysses: int, ring: int) -> Topology:
    """One Topology per factorization per worker: groups are created once, by every rank in one order."""
    key = (ulysses, ring)
    if key not in _TOPOLOGIES:
        _TOPOLOGIES[key] = Topology(ulysses=ulysses, ring=ring)
    return _TOPOLOGIES[key]


def naive_attention(q, k, v, causal, scale):
    """Textbook softmax attention, float64 autograd: ``[B, S, H, D]`` inputs, GQA by repeating kv heads."""
    H, Hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        S = q.shape[1]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _inputs(seed, B, S, H, Hkv, D):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, S, h, D, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv), mk(H)


def attention_vs_reference(ulysses, ring, B, S, H, Hkv, D, causal, seed=0, dtype=torch.float32,
                           kernel="auto", chunk_size=None, offload=False, scale=None, **options):
    """Relative errors of out, dq, dk, dv of the distributed attention against the float64 reference."""
    topo = topology(ulysses, ring)
    # Rounded to the tested dtype first, so the reference sees exactly the inputs the distributed path sees.
    q, k, v, dout = (t.to(dtype).double() for t in _inputs(seed + 1000 * topo.dp_rank, B, S, H, Hkv, D))
    sm_scale = D ** -0.5 if scale is None else scale
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = naive_attention(*ref_in, causal, sm_scale)
    ref_out.backward(dout)

    local = [shard(t.to(dtype), topo).detach().requires_grad_() for t in (q, k, v)]
    out = attention(*local, topo, causal=causal, softmax_scale=scale, kernel=kernel, chunk_size=chunk_size,
                    offload=offload, **options)
    out.backward(shard(dout.to(dtype), topo))
    got = [unshard(out.detach(), topo)] + [unshard(t.grad, topo) for t in local]
    want = [ref_out.detach()] + [t.grad for t in ref_in]
    return {name: rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}


def error_on_every_rank(ulysses, ring, B, S_local, H, Hkv, D, **kwargs):
    """The error type and message raised by a bad call, then proof that no rank was left in a collective."""
    topo = topology(ulysses, ring)
    q = torch.randn(B, S_local, H, D)
    kv = torch.randn(B, S_local, Hkv, D)
    caught = None
    try:
        attention(q, kv, kv.clone(), topo, **kwargs)
    except Exception as exc:  # noqa: BLE001 - returned to the test
        caught = (type(exc).__name__, str(exc))
    probe = torch.ones(1)
    dist.all_reduce(probe)  # would hang or mismatch if a rank were still inside an attention collective
    return caught, probe.item()


def layout_roundtrip(ulysses, ring, S):
    """``unshard(shard(x)) == x`` and the positions of all ranks tile ``range(S)`` exactly once."""
    from ds_longctx.layout import positions

    topo = topology(ulysses, ring)
    x = torch.arange(2 * S * 3, dtype=torch.float32).view(2, S, 3)
    back = unshard(shard(x, topo), topo)
    pos = positions(S, topo)
    everyone = [torch.empty_like(pos) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, pos)
    mine = torch.cat([everyone[r] for r in topo.sp_ranks])
    holds_its_positions = torch.equal(shard(x, topo)[0, :, 0], (pos * 3).float())
    return torch.equal(back, x), sorted(mine.tolist()) == list(range(S)), holds_its_positions
