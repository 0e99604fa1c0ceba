"""FPDT chunked attention (per-chunk all-to-all, chunked ring, host offload) equals single-device float64
attention and the unchunked path, forward and backward, on gloo in fp32 to 1e-5 relative; the chunked
layout, the chunk schedule, the host pool and the chunk-size checks."""
from __future__ import annotations

import gc

import pytest
import torch

from ds_longctx.attention import attention
from ds_longctx.attention.chunked import ChunkSchedule
from ds_longctx.layout import ZigzagLayout
from ds_longctx.memory import HostMemoryError, HostPool
from ds_longctx.topology import Topology
from tests import dist_cases

TOL = 1e-5
FACTORIZATIONS_OF_4 = [(u, r) for u in (1, 2, 4) for r in (1, 2, 4) if 4 % (u * r) == 0]
HEADS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}


def check(results, configs, tol=TOL):
    for rank, per_rank in enumerate(results):
        for cfg, res in zip(configs, per_rank):
            for kind in ("ref", "unchunked"):
                for name, err in res[kind].items():
                    assert err < tol, f"rank {rank} {cfg}: {name} vs {kind} relative error {err:.3g} >= {tol}"
            offload = cfg[-1]
            # Offload must really go through leased host buffers, and give them all back after backward.
            assert (res["leased_during_backward"] > 0) == offload, (rank, cfg, res)
            assert res["leased_after"] == 0, (rank, cfg, res)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("ulysses,ring", FACTORIZATIONS_OF_4, ids=[f"u{u}-r{r}" for u, r in FACTORIZATIONS_OF_4])
def test_chunked_attention_matches_reference_and_unchunked_path(dist_pools, ulysses, ring, causal):
    """Every factorization of 4 (and, through data-parallel replicas, of 2 and 1): MHA/GQA/MQA, 1, 2 and 4
    chunks per group sequence, offload on and off."""
    S = 16 * ulysses * ring
    L = S // ring
    configs = [(2, S, H, Hkv, 8, causal, L // n_chunks, offload)
               for H, Hkv in HEADS.values() for n_chunks in (1, 2, 4) for offload in (False, True)]
    check(dist_pools(4).run(dist_cases.chunked_vs_reference, ulysses, ring, configs,
                            seed=ulysses * 10 + ring + 100 * causal), configs)


STRADDLE = [(1, 2), (2, 2), (1, 4)]


@pytest.mark.parametrize("ulysses,ring", STRADDLE, ids=[f"u{u}-r{r}" for u, r in STRADDLE])
def test_chunks_that_straddle_the_zigzag_halves_stay_exact(dist_pools, ulysses, ring):
    """3 chunks per group sequence: the middle chunk holds the end of the early zigzag half and the start of
    the late one, so only some of its rows see a ring peer's K/V, and only some K/V rows are sent."""
    S = 12 * ulysses * ring
    C = S // ring // 3
    configs = [(1, S, 8, 2, 8, causal, C, offload) for causal in (True, False) for offload in (False, True)]
    check(dist_pools(4).run(dist_cases.chunked_vs_reference, ulysses, ring, configs, seed=7), configs)


UNEVEN = [(4, 1, 6, 2), (4, 1, 6, 3), (2, 2, 5, 5), (4, 1, 4, 2), (2, 1, 3, 1)]


@pytest.mark.parametrize("ulysses,ring,H,Hkv", UNEVEN, ids=[f"u{u}-r{r}-h{h}-kv{k}" for u, r, h, k in UNEVEN])
def test_chunked_uneven_heads_and_replicated_kv_heads_stay_exact(dist_pools, ulysses, ring, H, Hkv):
    S = 16 * ulysses * ring
    configs = [(1, S, H, Hkv, 8, True, S // ring // 4, offload) for offload in (False, True)]
    check(dist_pools(4).run(dist_cases.chunked_vs_reference, ulysses, ring, configs, seed=H * 10 + Hkv), configs)


def test_bf16_chunked_stays_within_bf16_error_of_unchunked(dist_pools):
    configs = [(1, 128, 8, 2, 16, True, 16, True)]
    for per_rank in dist_pools(4).run(dist_cases.chunked_vs_reference, 2, 2, configs, dtype=torch.bfloat16):
        for res in per_rank:
            for kind in ("ref", "unchunked"):
                assert max(res[kind].values()) < 1e-2, res


def test_host_pool_buffers_are_allocated_once_and_reused_across_steps(dist_pools):
    configs = [(1, 64, 8, 2, 8, True, 8, True)]
    for per_rank in dist_pools(4).run(dist_cases.chunked_vs_reference, 2, 2, configs, repeat=3):
        allocs = per_rank[0]["allocations"]
        assert allocs[1] == allocs[2] == allocs[0], f"steps 2 and 3 allocated host memory again: {allocs}"


def test_single_process_without_torch_distributed():
    """``U = R = 1`` with no process group: the chunk schedule alone, against float64 attention."""
    topo = Topology()
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(2, 48, h, 8, generator=g) for h in (4, 2, 2, 4))
    for causal in (True, False):
        ins = [t.double().requires_grad_() for t in (q, k, v)]
        ref = dist_cases.naive_attention(*ins, causal, 8 ** -0.5)
        ref.backward(do.double())
        for chunk_size in (48, 16, 12):
            for offload in (False, True):
                loc = [t.clone().requires_grad_() for t in (q, k, v)]
                out = attention(*loc, topo, causal=causal, chunk_size=chunk_size, offload=offload)
                out.backward(do)
                for name, a, b in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in loc],
                                      [ref] + [t.grad for t in ins]):
                    err = dist_cases.rel(a, b)
                    assert err < TOL, (causal, chunk_size, offload, name, err)


def test_offloaded_store_keeps_no_view_of_a_larger_input_on_the_device():
    """With one Ulysses rank a chunk is a slice of the caller's tensor; the chunk the store keeps resident
    must not keep that whole tensor (a projection output of the model) alive after the forward."""
    from ds_longctx.memory import ChunkStore, HostPool

    whole = torch.randn(1, 64, 2, 8)
    pool = HostPool()
    store = ChunkStore(4, [((1, 16, 2, 8), whole.dtype)], whole.device, pool.lease())
    store.put(3, [whole[:, 48:]])
    kept = store.fetch(3).tensors[0]
    assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()
    assert torch.equal(kept, whole[:, 48:])


def test_forward_without_grad_returns_host_buffers_and_second_backward_is_refused():
    from ds_longctx.memory import default_pool

    topo = Topology()
    pool = default_pool()
    q = torch.randn(1, 32, 2, 8, requires_grad=True)
    kv = torch.randn(1, 32, 2, 8)
    with torch.no_grad():
        attention(q, kv, kv, topo, chunk_size=8, offload=True)
    assert pool.leased_bytes == 0
    out = attention(q, kv, kv, topo, chunk_size=8, offload=True)
    assert pool.leased_bytes > 0
    out.sum().backward(retain_graph=True)
    assert pool.leased_bytes == 0
    with pytest.raises(RuntimeError, match="retain_graph is not supported"):
        out.sum().backward()
    del out
    out = attention(q, kv, kv, topo, chunk_size=8, offload=True)
    del out  # a graph dropped without backward gives its buffers back too
    gc.collect()
    assert pool.leased_bytes == 0


# --------------------------------------------------------------------------------------------- layout


LAYOUTS = [(u, r, n) for u, r in FACTORIZATIONS_OF_4 for n in (1, 2, 4)]


@pytest.mark.parametrize("ulysses,ring,n_chunks", LAYOUTS, ids=[f"u{u}-r{r}-n{n}" for u, r, n in LAYOUTS])
def test_chunked_layout_roundtrips_tiles_and_gathers_chunks(dist_pools, ulysses, ring, n_chunks):
    S = 8 * ulysses * ring
    facts = dist_pools(4).run(dist_cases.chunked_layout_facts, ulysses, ring, S, S // ring // n_chunks)
    for rank, f in enumerate(facts):
        assert all(f), (rank, dict(zip(("roundtrip", "tiles", "holds", "plain_when_whole", "chunks_gather"), f)))


def test_chunked_layout_rejects_chunks_it_cannot_split():
    with pytest.raises(ValueError, match="not divisible by ulysses=4"):
        ZigzagLayout(2, 4, chunk_size=6).check(48)
    with pytest.raises(ValueError, match="does not divide the 24 tokens"):
        ZigzagLayout(2, 4, chunk_size=16).check(48)


@pytest.mark.parametrize("ring", [1, 2, 3, 4])
@pytest.mark.parametrize("n_chunks", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("causal", [True, False])
def test_chunk_schedule_covers_each_visible_pair_exactly_once(ring, n_chunks, causal):
    """Union over query chunks, K/V chunks and ring steps of what a rank computes = the (causal) mask on
    its queries, with no pair twice; and every transfer is sent exactly when its receiver expects it."""
    C = 2
    L = C * n_chunks
    if ring > 1 and L % 2:
        pytest.skip("a ring needs an even group sequence (two zigzag halves)")
    S = L * ring
    layout = ZigzagLayout(ring, 1)
    scheds = [ChunkSchedule(n_chunks, C, ring, r, causal) for r in range(ring)]
    for r in range(ring):
        sc = scheds[r]
        q_pos = layout.local_positions(S, r, 0)
        seen = torch.zeros(L, S, dtype=torch.int64)
        for i in range(n_chunks):
            assert sc.groups(i) == scheds[0].groups(i)  # group indices are global: one message order
            for k in range(sc.groups(i)):
                qi = torch.arange(i * C, (i + 1) * C)
                flag = sc.own(i, k)
                if flag is not None:
                    for a in qi:
                        for b in range(k * C, (k + 1) * C):
                            if not flag or b - k * C <= a - i * C:
                                seen[a, q_pos[b]] += 1
                for s in range(1, ring):
                    src = sc.src(s)
                    blk = sc.sees(r, src, i, k)
                    sender = scheds[src]
                    assert sender.sees(sender.dst(s), src, i, k) == blk  # the sender sends what r receives
                    if blk is None:
                        continue
                    k_pos = layout.local_positions(S, src, 0)[k * C:(k + 1) * C]
                    for a in qi[blk[0]]:
                        for b in k_pos[blk[1]]:
                            seen[a, b] += 1
            for k in range(sc.groups(i), n_chunks):  # beyond the groups nothing is visible
                assert sc.own(i, k) is None and all(sc.sees(r, sc.src(s), i, k) is None for s in range(1, ring))
        want = (torch.arange(S)[None, :] <= q_pos[:, None]).long() if causal else torch.ones(L, S, dtype=torch.int64)
        assert torch.equal(seen, want), f"rank {r}"


# --------------------------------------------------------------------------------------------- checks


BAD_CHUNKS = [
    # (ulysses, ring, S_local, kwargs, expected fragment): every rank must raise it, before any collective
    (2, 2, 8, {"chunk_size": 3}, "chunk_size 3 is not a multiple of ulysses=2"),
    (2, 2, 8, {"chunk_size": 6}, "does not divide the group sequence of L = S_local 8 x ulysses 2 = 16"),
    (2, 2, 8, {"chunk_size": 32}, "use a multiple of 2 that divides 16, e.g. 16"),
    (1, 4, 8, {"chunk_size": 0}, "chunk_size must be a positive integer"),
    (4, 1, 4, {"chunk_size": 8.0}, "chunk_size must be a positive integer"),
]


@pytest.mark.parametrize("case", BAD_CHUNKS, ids=[c[-1][:30] for c in BAD_CHUNKS])
def test_bad_chunk_size_raises_the_same_clear_error_on_every_rank(dist_pools, case):
    ulysses, ring, S_local, kwargs, fragment = case
    results = dist_pools(4).run(dist_cases.error_on_every_rank, ulysses, ring, 1, S_local, 4, 2, 8, timeout=60,
                                **kwargs)
    errors = [caught for caught, _ in results]
    assert all(e is not None for e in errors), errors
    assert len(set(errors)) == 1, f"ranks disagree: {errors}"
    assert errors[0][0] == "AttentionInputError" and fragment in errors[0][1], errors[0]
    assert all(total == 4.0 for _, total in results)


# --------------------------------------------------------------------------------------------- host pool


def test_host_pool_reuses_the_same_storage_and_releases_it():
    pool = HostPool()
    lease = pool.lease()
    a = lease.acquire((4, 8), torch.float32, pin=False)
    b = lease.acquire((2, 3), torch.bfloat16, pin=False)
    ptrs = {a.data_ptr(), b.data_ptr()}
    held = pool.held_bytes
    assert held == 4 * 8 * 4 + 2 * 3 * 2 and pool.leased_bytes == held
    lease.release()
    lease.release()  # idempotent: nothing is handed back twice
    assert pool.leased_bytes == 0 and pool.idle_bytes == held
    again = pool.lease()
    a2 = again.acquire((4, 8), torch.float32, pin=False)
    b2 = again.acquire((2, 3), torch.bfloat16, pin=False)
    assert {a2.data_ptr(), b2.data_ptr()} == ptrs and pool.allocations == 2
    other = again.acquire((4, 8), torch.float32, pin=False)  # both are leased: a second one is needed
    assert other.data_ptr() not in ptrs and pool.allocations == 3
    again.release()
    pool.release()
    assert pool.held_bytes == 0 and pool.idle_bytes == 0
    del again
    with pool:  # released on leaving the block
        pool.lease().acquire((5,), torch.float32, pin=False)
        gc.collect()  # the lease was dropped: its buffer is idle again
        assert pool.idle_bytes == 20
    assert pool.held_bytes == 0


def test_host_pool_names_the_bytes_it_could_not_get():
    limited = HostPool(limit_bytes=1000)
    limited.lease().acquire((100,), torch.float32, pin=False)
    with pytest.raises(HostMemoryError, match=r"needs 800 more bytes .* limited to 1000 bytes and already holds 400"):
        limited.lease().acquire((200,), torch.float32, pin=False)
    with pytest.raises(HostMemoryError, match=r"could not allocate 4611686018427387904 bytes"):
        HostPool().lease().acquire((2 ** 60,), torch.float32, pin=False)
