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


def release_topologies() -> int:
    """Destroy this worker's cached topologies (between test modules): every live gloo group keeps a loop
    thread that wakes on its own, and a session's worth of them takes CPU from the tests that follow."""
    released = len(_TOPOLOGIES)
    for topo in _TOPOLOGIES.values():
        topo.destroy()
    _TOPOLOGIES.clear()
    return released


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


def chunked_vs_reference(ulysses, ring, configs, seed=0, dtype=torch.float32, repeat=1):
    """FPDT chunked attention on inputs in the chunked layout, for each config ``(B, S, H, Hkv, D, causal,
    chunk_size, offload)``: relative errors of out, dq, dk, dv against the float64 reference and against the
    unchunked path (same inputs, plain layout), and the default host pool's state around the calls.

    ``repeat`` runs each config that many times (a second forward/backward must reuse the pool's buffers).
    """
    from ds_longctx.memory import default_pool

    topo = topology(ulysses, ring)
    pool = default_pool()
    results = []
    for n, (B, S, H, Hkv, D, causal, chunk_size, offload) in enumerate(configs):
        q, k, v, dout = (t.to(dtype).double() for t in
                         _inputs(seed + 7 * n + 1000 * topo.dp_rank, B, S, H, Hkv, D))
        scale = D ** -0.5
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out = naive_attention(*ref_in, causal, scale)
        ref_out.backward(dout)
        want = [ref_out.detach()] + [t.grad for t in ref_in]

        plain = [shard(t.to(dtype), topo).detach().requires_grad_() for t in (q, k, v)]
        out = attention(*plain, topo, causal=causal)
        out.backward(shard(dout.to(dtype), topo))
        unchunked = [unshard(out.detach(), topo)] + [unshard(t.grad, topo) for t in plain]

        allocations = []
        for _ in range(repeat):
            local = [shard(t.to(dtype), topo, chunk_size=chunk_size).detach().requires_grad_() for t in (q, k, v)]
            out = attention(*local, topo, causal=causal, chunk_size=chunk_size, offload=offload)
            leased_in_flight = pool.leased_bytes
            out.backward(shard(dout.to(dtype), topo, chunk_size=chunk_size))
            allocations.append(pool.allocations)
        got = [unshard(out.detach(), topo, chunk_size=chunk_size)] + \
              [unshard(t.grad, topo, chunk_size=chunk_size) for t in local]
        names = ("out", "dq", "dk", "dv")
        results.append({
            "ref": {name: rel(a, b) for name, a, b in zip(names, got, want)},
            "unchunked": {name: rel(a, b) for name, a, b in zip(names, got, unchunked)},
            "leased_during_backward": leased_in_flight, "leased_after": pool.leased_bytes,
            "allocations": allocations,
        })
    return results


def chunked_layout_facts(ulysses, ring, S, chunk_size):
    """Facts of the chunked layout on this rank: shard/unshard roundtrip, positions tiling ``range(S)``,
    ``chunk_size = S / ring`` equal to the plain layout, and local rows ``[i*C/U, (i+1)*C/U)`` of the
    Ulysses ranks gathering (in rank order) into chunk ``i`` of the ring position's group sequence."""
    from ds_longctx.layout import ZigzagLayout, positions

    topo = topology(ulysses, ring)
    x = torch.arange(2 * S * 3, dtype=torch.float32).view(2, S, 3)
    local = shard(x, topo, chunk_size=chunk_size)
    roundtrip = torch.equal(unshard(local, topo, chunk_size=chunk_size), x)
    pos = positions(S, topo, chunk_size=chunk_size)
    holds_its_positions = torch.equal(local[0, :, 0], (pos * 3).float())
    everyone = [torch.empty_like(pos) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, pos)
    tiles = sorted(torch.cat([everyone[r] for r in topo.sp_ranks]).tolist()) == list(range(S))
    L = S // ring
    plain_when_whole = torch.equal(positions(S, topo, chunk_size=L), positions(S, topo))
    group_seq = ZigzagLayout(ring, 1).local_positions(S, topo.ring_rank, 0)
    c = chunk_size // ulysses
    pieces = [everyone[r] for r in topo.ulysses_ranks]
    chunks_gather = all(
        torch.equal(torch.cat([p[i * c:(i + 1) * c] for p in pieces]), group_seq[i * chunk_size:(i + 1) * chunk_size])
        for i in range(L // chunk_size))
    return roundtrip, tiles, holds_its_positions, plain_when_whole, chunks_gather


class counted_kernel_forwards:
    """Context manager: counts local-kernel forward calls of :func:`ds_longctx.attention.attention` (every
    block of every ring step and chunk) in ``.forwards``."""

    def __init__(self):
        self.forwards = 0

    def __enter__(self):
        import ds_longctx.attention as attention_module

        self._module, self._get = attention_module, attention_module.get_kernel
        counter = self

        from ds_longctx.kernels.base import Kernel

        class Counting(Kernel):  # the base class's varlen pair loops through forward/backward: counted too
            def __init__(self, inner):
                self.inner, self.name = inner, inner.name

            def forward(self, *args, **kwargs):
                counter.forwards += 1
                return self.inner.forward(*args, **kwargs)

            def backward(self, *args, **kwargs):
                return self.inner.backward(*args, **kwargs)

        attention_module.get_kernel = lambda *a, **k: Counting(self._get(*a, **k))
        return self

    def __exit__(self, *exc):
        self._module.get_kernel = self._get


def checkpointed_attention_vs_plain(ulysses, ring, B, S, H, Hkv, D, chunk_size=None, offload=False, seed=0,
                                    **options):
    """A region ``tanh(attention(1.5 q, k, v) @ w)`` run plainly and under ``ds_longctx.memory.remat.checkpoint``
    (keeping the attention output, and not), non-reentrant and reentrant: per mode the relative errors of the
    output and the q/k/v/w gradients against the plain run (and the plain run's against the float64
    reference), the kernel forward calls of forward + backward, and the host bytes still leased after
    the forward."""
    from ds_longctx.memory import default_pool
    from ds_longctx.memory.checkpoint_offload import CheckpointOffload
    from ds_longctx.memory.remat import checkpoint

    topo = topology(ulysses, ring)
    q, k, v, _ = (t.float().double() for t in _inputs(seed + 1000 * topo.dp_rank, B, S, H, Hkv, D))
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(H * D, H * D, generator=g, dtype=torch.float64) / (H * D) ** 0.5

    def region(q_, k_, v_, w_):
        o = attention(q_ * 1.5, k_, v_, topo, chunk_size=chunk_size, offload=offload, **options)
        return torch.tanh(o.reshape(*o.shape[:2], -1) @ w_)

    def ref_region(q_, k_, v_, w_):
        o = naive_attention(q_ * 1.5, k_, v_, True, D ** -0.5)
        return torch.tanh(o.reshape(*o.shape[:2], -1) @ w_)

    ref_in = [t.clone().requires_grad_() for t in (q, k, v, w)]
    ref_out = ref_region(*ref_in)
    ref_out.sum().backward()

    modes = {"plain": lambda *a: region(*a),
             "keep": lambda *a: checkpoint(region, *a),
             "keep_reentrant": lambda *a: checkpoint(region, *a, use_reentrant=True),
             "recompute": lambda *a: checkpoint(region, *a, keep_attention_output=False),
             # every saved input of the region (min_bytes=0) and the kept output in host memory
             "keep_offloaded": lambda *a: checkpoint(region, *a, offload=CheckpointOffload(min_bytes=0)),
             "keep_offloaded_reentrant": lambda *a: checkpoint(region, *a, use_reentrant=True,
                                                               offload=CheckpointOffload(min_bytes=0))}
    runs = {}
    for name, run in modes.items():
        local = [shard(t.float(), topo, chunk_size=chunk_size).detach().requires_grad_() for t in (q, k, v)]
        w_ = w.float().clone().requires_grad_()
        with counted_kernel_forwards() as counted:
            y = run(*local, w_)
            leased = default_pool().leased_bytes
            # each rank's loss is the sum of its shard; summed over ranks it is the full sequence's
            y.sum().backward()
        got = [unshard(y.detach(), topo, chunk_size=chunk_size)] + \
              [unshard(t.grad, topo, chunk_size=chunk_size) for t in local]
        del y  # the graph, and with it the checkpoint's stash
        dw = w_.grad.clone()
        dist.all_reduce(dw, group=topo.sp_group)
        runs[name] = {"got": got + [dw], "forwards": counted.forwards, "leased_after_forward": leased,
                      "leased_after_backward": default_pool().leased_bytes}
    plain = runs["plain"]["got"]
    names = ("out", "dq", "dk", "dv", "dw")
    result = {"reference": {n: rel(a, b) for n, a, b in zip(names, plain, [ref_out.detach()] +
                                                               [t.grad for t in ref_in])},
              "input_bytes": sum(t.numel() * 4 for t in (q, k, v)) // topo.sp + w.numel() * 4}
    for name, r in runs.items():
        result[name] = {"vs_plain": {n: rel(a, b) for n, a, b in zip(names, r["got"], plain)},
                        "forwards": r["forwards"], "leased_after_forward": r["leased_after_forward"],
                        "leased_after_backward": r["leased_after_backward"]}
    return result


def document_mask(S, cu_seqlens, causal):
    """``[S, S]`` bool, True where query i may not see key j: another document (or a later token)."""
    doc = torch.bucketize(torch.arange(S), torch.tensor(cu_seqlens[1:]), right=True)
    hidden = doc[:, None] != doc[None, :]
    if causal:
        hidden |= torch.ones(S, S, dtype=torch.bool).triu(1)
    return hidden


def naive_packed_attention(q, k, v, cu_seqlens, causal, scale):
    """:func:`naive_attention` with a document mask: each token sees only tokens of its own document."""
    H, Hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(document_mask(q.shape[1], list(cu_seqlens), causal), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def packed_vs_reference(ulysses, ring, configs, seed=0, dtype=torch.float32):
    """Packed documents: for each config ``(B, S, H, Hkv, D, causal, cu_seqlens, chunk_size, offload)`` the
    relative errors of out, dq, dk, dv against the float64 document-masked reference."""
    topo = topology(ulysses, ring)
    results = []
    for n, (B, S, H, Hkv, D, causal, cu_seqlens, chunk_size, offload) in enumerate(configs):
        q, k, v, dout = (t.to(dtype).double() for t in
                         _inputs(seed + 7 * n + 1000 * topo.dp_rank, B, S, H, Hkv, D))
        scale = D ** -0.5
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out = naive_packed_attention(*ref_in, cu_seqlens, causal, scale)
        ref_out.backward(dout)
        want = [ref_out.detach()] + [t.grad for t in ref_in]
        local = [shard(t.to(dtype), topo, chunk_size=chunk_size).detach().requires_grad_() for t in (q, k, v)]
        out = attention(*local, topo, causal=causal, chunk_size=chunk_size, offload=offload, cu_seqlens=cu_seqlens)
        out.backward(shard(dout.to(dtype), topo, chunk_size=chunk_size))
        got = [unshard(out.detach(), topo, chunk_size=chunk_size)] + \
              [unshard(t.grad, topo, chunk_size=chunk_size) for t in local]
        results.append({name: rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)})
    return results
