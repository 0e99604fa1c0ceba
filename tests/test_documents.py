"""Packed documents (``cu_seqlens``): every distributed path (Ulysses, ring, hybrid, FPDT chunks with and
without offload) equals the single-device float64 attention with a document mask, forward and backward, for
every factorization of world sizes 1, 2, 4 and 8 (gloo, fp32, 1e-5 relative); the block split and the
boundary checks."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_longctx.attention.checks import AttentionInputError
from ds_longctx.attention.documents import Documents, slice_runs
from ds_longctx.attention.merge import merge_
from ds_longctx.layout import ZigzagLayout
from tests import dist_cases

TOL = 1e-5


def factorizations(world):
    return [(u, r) for u in range(1, world + 1) for r in range(1, world + 1) if world % (u * r) == 0]


CASES = [(w, u, r) for w in (1, 2, 4, 8) for u, r in factorizations(w)]


def packings(S, seed):
    """Boundaries that cut zigzag chunks, Ulysses pieces and chunk edges in different places: one-token
    documents at both ends, a document across the middle (it spans the two zigzag halves of every ring
    position), many short ones, and random cuts."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, S), min(S - 1, 5)))
    return [
        [0, 1, S - 1, S],
        [0, S // 2 - S // 8 - 1, S // 2 + S // 8 + 1, S],
        list(range(0, S, 3)) + [S],
        [0] + cuts + [S],
    ]


def assert_close(results, configs, tol=TOL):
    for rank, per_rank in enumerate(results):
        for cfg, errs in zip(configs, per_rank):
            for name, err in errs.items():
                assert err < tol, f"rank {rank} {cfg}: {name} relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("world,ulysses,ring", CASES, ids=[f"w{w}-u{u}-r{r}" for w, u, r in CASES])
def test_packed_documents_match_document_masked_reference(dist_pools, world, ulysses, ring):
    S = 8 * ulysses * ring
    configs = [(2, S, 8, 2, 8, causal, cu, None, False) for causal in (True, False) for cu in packings(S, world)]
    configs.append((1, S, 8, 1, 8, True, [0, S // 3, S], None, False))  # MQA
    assert_close(dist_pools(world).run(dist_cases.packed_vs_reference, ulysses, ring, configs,
                                       seed=world * 100 + ulysses * 10 + ring), configs)


FACTORIZATIONS_OF_4 = factorizations(4)


@pytest.mark.parametrize("ulysses,ring", FACTORIZATIONS_OF_4, ids=[f"u{u}-r{r}" for u, r in FACTORIZATIONS_OF_4])
def test_packed_documents_through_fpdt_chunks_and_offload(dist_pools, ulysses, ring):
    """1, 3 (straddling the zigzag halves) and 4 chunks per group sequence, offload on and off: a query chunk
    may see nothing of a K/V chunk, or nothing at all of its first one (the merge starts from empty rows)."""
    S = 24 * ulysses * ring
    L = S // ring
    configs = [(1, S, 8, 2, 8, causal, cu, L // n_chunks, offload)
               for causal in (True, False) for n_chunks in (1, 3, 4) for offload in (False, True)
               for cu in packings(S, n_chunks)[1:3]]
    assert_close(dist_pools(4).run(dist_cases.packed_vs_reference, ulysses, ring, configs,
                                   seed=ulysses * 10 + ring), configs)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_packings_match_reference(dist_pools, data):
    ulysses, ring = data.draw(st.sampled_from(factorizations(4)), label="ulysses,ring")
    m = ZigzagLayout(ring, ulysses).multiple
    S = m * data.draw(st.integers(max(1, 32 // m), max(1, 32 // m) + 3), label="S multiple")
    # Documents of 8+ tokens: with 1-2 keys a row's dq is a difference of nearly equal fp32 products whose
    # rounding alone exceeds 1e-5 relative (the fixed packings above cover tiny documents, seeded).
    lengths = data.draw(st.lists(st.integers(8, 24), min_size=0, max_size=6), label="document lengths")
    cu = [0]
    for n in lengths:
        if cu[-1] + n > S - 8:
            break
        cu.append(cu[-1] + n)
    cu.append(S)
    causal = data.draw(st.booleans(), label="causal")
    chunked = data.draw(st.booleans(), label="chunked") and S // ring % (2 * ulysses) == 0
    chunk = S // ring // 2 if chunked else None
    configs = [(2, S, 4, 2, 8, causal, cu, chunk, chunked and data.draw(st.booleans(), label="offload"))]
    assert_close(dist_pools(4).run(dist_cases.packed_vs_reference, ulysses, ring, configs,
                                   seed=data.draw(st.integers(0, 10**6))), configs)


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (1, 4)])
def test_packed_bf16_stays_within_bf16_error(dist_pools, ulysses, ring):
    S = 32 * ulysses * ring
    configs = [(1, S, 8, 2, 16, True, [0, S // 4 + 1, S // 2 + 3, S], None, False),
               (1, S, 8, 2, 16, True, [0, S // 4 + 1, S // 2 + 3, S], S // ring // 2, True)]
    assert_close(dist_pools(4).run(dist_cases.packed_vs_reference, ulysses, ring, configs, dtype=torch.bfloat16),
                 configs, tol=1e-2)


BAD = [
    ([1, 64], "from 0 to the global sequence length 64"),
    ([0, 32], "from 0 to the global sequence length 64"),
    ([0, 40, 40, 64], "increase strictly"),
    (torch.tensor([0.0, 64.0]), "1-D integer tensor"),
    ([0, 32.5, 64], "integers"),
]


@pytest.mark.parametrize("cu,message", BAD, ids=["start", "end", "empty-document", "float-tensor", "float"])
def test_bad_boundaries_fail_on_every_rank_before_any_collective(dist_pools, cu, message):
    results = dist_pools(4).run(dist_cases.error_on_every_rank, 2, 2, 1, 16, 4, 2, 8, cu_seqlens=cu)
    for caught, probe in results:
        assert caught is not None and caught[0] == "AttentionInputError" and message in caught[1], caught
        assert probe == 4.0


def test_one_document_is_the_plain_schedule():
    docs = Documents.of(torch.tensor([0, 64]), 64)
    assert docs.count == 1
    assert docs.pieces(((0, 8), (56, 8)), ((0, 8), (56, 8)), True) is None


def test_rows_of_a_document_are_one_range_per_block_side():
    docs = Documents([0, 5, 6, 30, 61, 64])
    # zigzag group of ring position 1 of 2 at S = 64: positions 16..31, then 32..47
    runs = ZigzagLayout(2, 1).group_runs(64, 1)
    assert runs == ((16, 16), (32, 16))
    assert docs.spans(runs) == {2: (0, 14), 3: (14, 32)}
    # rows 10..20 of that group: positions 26..31 and 32..36
    assert slice_runs(runs, slice(10, 21)) == ((26, 6), (32, 5))
    # K/V of ring position 0 (positions 0..15 and 48..63) against it: documents 2 and 3 are shared
    pieces = docs.pieces(runs, ZigzagLayout(2, 1).group_runs(64, 0), False)
    assert pieces == [(slice(0, 14), slice(6, 16)), (slice(14, 32), slice(16, 29))]


def test_merge_starting_from_rows_that_saw_nothing():
    """A running row that saw no key yet (lse -inf, out 0) takes the block's value; a row empty on both
    sides stays empty; a block row that saw nothing leaves the running row unchanged."""
    ninf = float("-inf")
    out = torch.tensor([[[[0.0]], [[0.0]], [[2.0]]]])  # [B=1, S=3, H=1, D=1]
    lse = torch.tensor([[[ninf, ninf, 1.0]]])
    blk_out = torch.tensor([[[[5.0]], [[0.0]], [[0.0]]]])
    blk_lse = torch.tensor([[[0.5, ninf, ninf]]])
    merge_(out, lse, blk_out, blk_lse, empty_rows=True)
    assert out.flatten().tolist() == [5.0, 0.0, 2.0]
    assert lse.flatten().tolist() == [0.5, ninf, 1.0]


def test_documents_reject_malformed_boundaries_with_the_field_name():
    with pytest.raises(AttentionInputError, match="cu_seqlens"):
        Documents.of([0, 10, 5, 16], 16)


def test_packing_is_read_from_position_ids_by_transformers_rule():
    """A document starts wherever a position id is not its predecessor + 1: the same documents as
    transformers' own ``find_packed_sequence_indices`` finds."""
    from transformers.masking_utils import find_packed_sequence_indices

    from ds_longctx.integration.data import packed_boundaries

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        S = int(torch.randint(2, 40, (1,), generator=g))
        lengths, left = [], S
        while left:
            lengths.append(int(torch.randint(1, left + 1, (1,), generator=g)))
            left -= lengths[-1]
        pos = torch.cat([torch.arange(n) + int(torch.randint(0, 3, (1,), generator=g)) * (i == 0)
                         for i, n in enumerate(lengths)]).unsqueeze(0)
        cu = packed_boundaries(pos)
        theirs = find_packed_sequence_indices(pos)
        ids = torch.zeros(S, dtype=torch.long) if theirs is None else theirs[0]
        mine = torch.bucketize(torch.arange(S), torch.tensor((cu or [0, S])[1:]), right=True)
        assert torch.equal(mine, ids - ids[0]), (pos, cu, theirs)
    with pytest.raises(ValueError, match="different document boundaries"):
        packed_boundaries(torch.stack([torch.arange(8), torch.arange(8) % 4]))


@pytest.mark.parametrize("kernel_name", ["reference", "sdpa_cpu_flash"])
def test_a_block_whose_sides_hold_different_documents_attends_only_to_shared_ones(kernel_name):
    """Query rows at positions 4..11 and 20..27, keys at 0..25: the documents the sides share are not
    adjacent rows on the key side (document [12, 20) lies between), and query rows of a document the keys
    lack see nothing (out 0, lse -inf). Forward and backward against float64 autograd on the visible rows."""
    from ds_longctx.kernels import KERNELS

    kernel = KERNELS[kernel_name]
    docs = Documents([0, 6, 12, 20, 26, 32])
    q_runs, k_runs = ((4, 8), (20, 8)), ((0, 26),)
    qpos = torch.tensor([p + i for p, n in q_runs for i in range(n)])
    kpos = torch.arange(26)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 26, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(2, 16, 4, 8, generator=g, dtype=torch.float64)
    doc = lambda p: torch.bucketize(p, torch.tensor(docs.bounds[1:]), right=True)  # noqa: E731
    visible = doc(qpos)[:, None] == doc(kpos)[None, :]
    seen = visible.any(1)
    assert not seen.all() and seen.any()  # rows 26, 27 hold document 4, which the keys lack

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    kk, vv = (t.repeat_interleave(2, dim=2) for t in ref_in[1:])
    s = torch.einsum("bqhd,bkhd->bhqk", ref_in[0], kk) * 0.3
    s = s.masked_fill(~visible, float("-inf"))[:, :, seen]
    want_lse = torch.logsumexp(s, -1)
    want = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vv)
    (want * dout[:, seen]).sum().backward()

    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out, lse = docs.forward(kernel, *leaves, q_runs, k_runs, False, 0.3)
    assert torch.equal(out[:, ~seen], torch.zeros_like(out[:, ~seen]))
    assert bool((lse[:, :, ~seen] == float("-inf")).all())
    assert dist_cases.rel(out[:, seen], want) < 1e-5 and dist_cases.rel(lse[:, :, seen], want_lse) < 1e-5
    grads = docs.backward(kernel, dout.float(), *leaves, out, lse, q_runs, k_runs, False, 0.3)
    for got, t in zip(grads, ref_in):
        assert dist_cases.rel(got, t.grad) < 1e-5
