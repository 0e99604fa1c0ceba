"""The zigzag layout: shard/unshard invert each other, ranks tile the sequence, causal work is balanced."""
from __future__ import annotations

import pytest
import torch

from ds_longctx.layout import LayoutError, ZigzagLayout
from tests import dist_cases


@pytest.mark.parametrize("ulysses,ring", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)])
def test_unshard_inverts_shard_and_ranks_tile_the_sequence(dist_pools, ulysses, ring):
    dp = 4 // (ulysses * ring)
    S = ZigzagLayout(ring, ulysses).multiple * 3
    for roundtrip, tiles, holds in dist_pools(4).run(dist_cases.layout_roundtrip, ulysses, ring, S):
        assert roundtrip and tiles and holds, (dp, roundtrip, tiles, holds)


@pytest.mark.parametrize("ring", [2, 3, 4, 8])
def test_zigzag_gives_every_ring_rank_the_same_causal_work(ring):
    S = 2 * ring * 5
    layout = ZigzagLayout(ring, 1)
    work = []
    for r in range(ring):
        q_pos = layout.local_positions(S, r, 0)
        work.append(sum(int((layout.local_positions(S, src, 0)[None, :] <= q_pos[:, None]).sum())
                        for src in range(ring)))
    assert len(set(work)) == 1, work


@pytest.mark.parametrize("ring", [2, 3, 4])
def test_ring_schedule_covers_exactly_the_causal_pairs(ring):
    """Union over steps of the block each rank computes = the causal mask restricted to its queries."""
    S = 2 * ring * 3
    layout = ZigzagLayout(ring, 1)
    for r in range(ring):
        q_pos = layout.local_positions(S, r, 0)
        seen = torch.zeros(len(q_pos), S, dtype=torch.int64)
        for step in range(ring):
            src = (r - step) % ring
            k_pos = layout.local_positions(S, src, 0)
            blk = layout.ring_block(step, r, True, len(q_pos))
            qi = torch.arange(len(q_pos))[blk.q]
            ki = torch.arange(len(k_pos))[blk.kv]
            for a in qi.tolist():
                for b in ki.tolist():
                    if not blk.causal or b <= a:
                        seen[a, k_pos[b]] += 1
        want = (torch.arange(S)[None, :] <= q_pos[:, None]).long()
        assert torch.equal(seen, want), f"rank {r}"


def test_indivisible_sequence_names_the_multiple():
    with pytest.raises(LayoutError, match="not divisible by 8"):
        ZigzagLayout(2, 4).check(12)
