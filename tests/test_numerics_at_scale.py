"""The bf16 error of the ring does not grow with its size: out, dq, dk and dv of ring attention over 8 ranks
stay within 1.5x of the error of one rank, both against a float64 reference (8 gloo processes, bf16 inputs).

Partial results merge through an fp32 log-sum-exp and dK/dV accumulate in fp32 while they travel, so a longer
ring adds no bf16 rounding per hop; users of other ring implementations reported errors growing with the ring.
"""
from __future__ import annotations

import pytest
import torch

from tests import dist_cases

RING, B, S, H, HKV, D = 8, 1, 512, 4, 2, 32


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bf16_error_of_ring_8_stays_within_1_5x_of_one_rank(dist_pools, causal):
    one = dist_cases.attention_vs_reference(1, 1, B, S, H, HKV, D, causal, dtype=torch.bfloat16)
    # rank 0 of the ring draws the same inputs as the single process (data-parallel rank 0, same seed)
    ring = dist_pools(RING).run(dist_cases.attention_vs_reference, 1, RING, B, S, H, HKV, D, causal,
                                dtype=torch.bfloat16, timeout=300)
    assert all(errs == ring[0] for errs in ring)  # gathered results: the same on every rank
    for name, err in ring[0].items():
        assert 0 < one[name] < 2e-2, (name, one)  # bf16's own error, the baseline
        assert err <= 1.5 * one[name], f"{name}: ring {RING} error {err:.3g} vs one rank {one[name]:.3g}"
