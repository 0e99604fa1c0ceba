"""Distributed attention equals single-device float64 attention, forward and backward, for every
factorization ``dp x ring x ulysses`` of world sizes 1, 2, 4 and 8 (gloo, fp32, relative error 1e-5)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import dist_cases

TOL = 1e-5


def factorizations(world):
    return [(u, r) for u in range(1, world + 1) for r in range(1, world + 1) if world % (u * r) == 0]


CASES = [(w, u, r) for w in (1, 2, 4, 8) for u, r in factorizations(w)]
HEADS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}


def assert_close(errors, tol=TOL):
    for rank, errs in enumerate(errors):
        for name, err in errs.items():
            assert err < tol, f"rank {rank}: {name} relative error {err:.3g} >= {tol} ({errs})"


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("world,ulysses,ring", CASES, ids=[f"w{w}-u{u}-r{r}" for w, u, r in CASES])
def test_distributed_attention_matches_single_device_reference(dist_pools, world, ulysses, ring, causal, heads):
    H, Hkv = HEADS[heads]
    S = 8 * ulysses * ring  # 4 tokens per zigzag chunk
    errors = dist_pools(world).run(dist_cases.attention_vs_reference, ulysses, ring, 2, S, H, Hkv, 16, causal,
                                   seed=world * 100 + ulysses * 10 + ring)
    assert_close(errors)


UNEVEN = [  # (ulysses, ring, H, Hkv): heads or kv heads not divisible by the ulysses degree
    (4, 1, 6, 2), (4, 1, 6, 3), (2, 2, 5, 5), (4, 2, 8, 1), (4, 2, 12, 3), (8, 1, 12, 4), (8, 1, 9, 3),
    (4, 1, 4, 2), (2, 1, 3, 1),
]


@pytest.mark.parametrize("ulysses,ring,H,Hkv", UNEVEN, ids=[f"u{u}-r{r}-h{h}-kv{k}" for u, r, h, k in UNEVEN])
def test_uneven_heads_and_replicated_kv_heads_stay_exact(dist_pools, ulysses, ring, H, Hkv):
    S = 8 * ulysses * ring
    errors = dist_pools(ulysses * ring).run(dist_cases.attention_vs_reference, ulysses, ring, 1, S, H, Hkv, 8,
                                            True, seed=H * 10 + Hkv)
    assert_close(errors)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes_match_reference(dist_pools, data):
    ulysses, ring = data.draw(st.sampled_from(factorizations(4)), label="ulysses,ring")
    kv_heads = data.draw(st.integers(1, 4), label="Hkv")
    group = data.draw(st.integers(1, 3), label="H/Hkv")
    H = kv_heads * max(group, -(-ulysses // kv_heads))  # at least ulysses query heads
    B = data.draw(st.integers(1, 2), label="B")
    D = data.draw(st.sampled_from([4, 8, 12]), label="D")
    from ds_longctx.layout import ZigzagLayout
    # At least 16 keys: with 2 keys dq = scale * ds_1 * (k_1 - k_2) is a difference of nearly equal fp32
    # products, whose rounding alone (on one device, any kernel) exceeds 1e-5 relative.
    m = ZigzagLayout(ring, ulysses).multiple
    S = m * data.draw(st.integers(max(1, 16 // m), max(1, 16 // m) + 3), label="S multiple")
    causal = data.draw(st.booleans(), label="causal")
    scale = data.draw(st.sampled_from([None, 0.3]), label="scale")
    errors = dist_pools(4).run(dist_cases.attention_vs_reference, ulysses, ring, B, S, H, kv_heads, D, causal,
                               seed=data.draw(st.integers(0, 10**6)), scale=scale)
    assert_close(errors)


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (1, 4)])
def test_bf16_inputs_stay_within_bf16_error(dist_pools, ulysses, ring):
    errors = dist_pools(4).run(dist_cases.attention_vs_reference, ulysses, ring, 1, 32 * ulysses * ring, 8, 2, 16,
                               True, dtype=torch.bfloat16)
    assert_close(errors, tol=1e-2)


@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu_flash"])
def test_each_cpu_kernel_runs_the_hybrid_schedule_exactly(dist_pools, kernel):
    errors = dist_pools(4).run(dist_cases.attention_vs_reference, 2, 2, 1, 32, 4, 2, 8, True, kernel=kernel)
    assert_close(errors)


@pytest.mark.parametrize("pipeline_chunks", [1, 2, 4, 8])
@pytest.mark.parametrize("ulysses,ring", [(2, 2), (4, 1)])
def test_head_pipelined_all_to_all_is_exact_for_any_chunk_count(dist_pools, ulysses, ring, pipeline_chunks):
    errors = dist_pools(4).run(dist_cases.attention_vs_reference, ulysses, ring, 1, 16 * ulysses * ring, 16, 8, 8,
                               True, pipeline_chunks=pipeline_chunks)
    assert_close(errors)


BAD_CALLS = [
    # (ulysses, ring, B, S_local, H, Hkv, D, kwargs, expected fragment)
    (4, 1, 1, 4, 2, 2, 8, {}, "ulysses degree 4 exceeds the 2 query heads"),
    (1, 2, 1, 3, 4, 2, 8, {}, "not divisible by 4"),
    (2, 1, 1, 4, 6, 4, 8, {}, "multiple of kv heads"),
    (1, 2, 1, 4, 4, 2, 8, {"kernel": "sdpa_cudnn"}, "sdpa_cudnn"),
    (1, 2, 1, 4, 4, 2, 8, {"kernel": "nope"}, "unknown kernel"),
    (1, 2, 1, 4, 4, 2, 8, {"offload": True}, "offload=True needs chunk_size"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[-1][:24] for c in BAD_CALLS])
def test_bad_input_raises_the_same_clear_error_on_every_rank_without_hanging(dist_pools, case):
    *args, kwargs, fragment = case
    results = dist_pools(4).run(dist_cases.error_on_every_rank, *args, timeout=60, **kwargs)
    errors = [caught for caught, _ in results]
    assert all(e is not None for e in errors), errors
    assert len(set(errors)) == 1, f"ranks disagree: {errors}"
    assert fragment in errors[0][1], errors[0]
    assert all(total == 4.0 for _, total in results)
