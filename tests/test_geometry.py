"""The FPDT chunk geometry (``ds_longctx.geometry``): sizes and counts from plain ints, the blocks each chunk
pair computes read from the layout's one visibility rule, and the device working set the planner reads."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ds_longctx.geometry import OFFLOAD_STEADY_CHUNKS, ChunkGeometry, ChunkSchedule
from ds_longctx.layout import EVERY, LayoutError, RingBlock, ZigzagLayout, ring_source
from tests import geometry_cases as tests_geometry_cases
from tests.geometry_cases import measured_working_set


def _rows(sl: slice, size: int) -> list:
    return list(range(*sl.indices(size)))


def test_sizes_and_counts_come_from_plain_ints():
    g = ChunkGeometry(seq_len=96, ulysses=2, ring=3, chunk_size=8)
    assert (g.group_len, g.chunk_tokens, g.local_chunk_tokens, g.chunks, g.local_len) == (32, 8, 4, 4, 16)
    layout = ZigzagLayout(3, 2, chunk_size=8)
    group = torch.cat([layout.local_positions(96, 1, u) for u in range(2)]).sort().values
    for i in range(g.chunks):  # local rows of chunk i on every Ulysses rank gather into chunk i
        pieces = [layout.local_positions(96, 1, u)[g.local_rows(i)] for u in range(2)]
        assert torch.equal(torch.cat(pieces), group[i * 8:(i + 1) * 8])


def test_a_length_the_layout_cannot_split_raises_the_layouts_error():
    with pytest.raises(LayoutError, match="does not divide the 24 tokens"):
        ChunkGeometry(seq_len=48, ulysses=4, ring=2, chunk_size=16)


@pytest.mark.parametrize("ring", [1, 2, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_one_chunk_per_ring_position_computes_the_ring_schedules_blocks(ring, causal):
    g = ChunkGeometry(seq_len=12 * ring, ulysses=1, ring=ring, chunk_size=12, causal=causal)
    layout = ZigzagLayout(ring, 1)
    for r in range(ring):
        for step in range(ring):
            want = layout.ring_block(step, r, causal, 12)
            got = g.block(r, ring_source(r, step, ring), 0, 0)
            assert (_rows(got.q, 12), _rows(got.kv, 12), got.causal) == \
                   (_rows(want.q, 12), _rows(want.kv, 12), want.causal)


class _Contiguous(ZigzagLayout):
    """A second load balancer: ring position r holds tokens [r*L, (r+1)*L) (no causal balance)."""

    def local_positions(self, seq_len, ring_rank, ulysses_rank, device=None):
        L = seq_len // self.ring
        return torch.arange(ring_rank * L, (ring_rank + 1) * L)

    def visible(self, q_rank, kv_rank, causal, group_len):
        if not causal or kv_rank < q_rank:
            return RingBlock(EVERY, EVERY, False)
        return RingBlock(EVERY, EVERY, True) if kv_rank == q_rank else None


@pytest.mark.parametrize("layout_class", [ZigzagLayout, _Contiguous], ids=["zigzag", "contiguous"])
@pytest.mark.parametrize("ring,n_chunks", [(1, 3), (2, 2), (3, 4), (4, 2)])
def test_a_load_balancer_is_one_class_whose_rule_the_chunk_schedule_follows(layout_class, ring, n_chunks):
    """Every causal (query, key) pair of the sequence is computed exactly once, whatever the layout."""
    C = 2
    L, S = C * n_chunks, C * n_chunks * ring
    layout = layout_class(ring, 1)
    scheds = [ChunkSchedule(n_chunks, C, ring, r, True, layout=layout) for r in range(ring)]
    for r, sc in enumerate(scheds):
        q_pos = layout.local_positions(S, r, 0)
        seen = torch.zeros(L, S, dtype=torch.int64)
        for i in range(n_chunks):
            assert sc.kv_steps(i) == scheds[0].kv_steps(i)
            for k in range(n_chunks):
                for kv_rank in range(ring):
                    blk = sc.block(r, kv_rank, i, k)
                    if blk is None:
                        continue
                    assert k < sc.kv_steps(i)  # every visible block lies within the query chunk's steps
                    k_pos = layout.local_positions(S, kv_rank, 0)[k * C:(k + 1) * C]
                    for a in _rows(blk.q, C):
                        for b in _rows(blk.kv, C):
                            if not blk.causal or b <= a:
                                seen[i * C + a, k_pos[b]] += 1
        assert torch.equal(seen, (torch.arange(S)[None, :] <= q_pos[:, None]).long()), f"rank {r}"


def _nbytes(g: ChunkGeometry, ws) -> int:
    return ws.nbytes(batch=1, chunk_tokens=g.chunk_tokens, heads=4, kv_heads=2, head_dim=8, chunks=g.chunks,
                     ring=g.ring, itemsize=2)


def test_with_offload_the_working_set_is_independent_of_the_sequence_and_grows_with_the_ring():
    short, long = (ChunkGeometry(seq_len=S, ulysses=2, ring=2, chunk_size=64) for S in (512, 4096))
    for phase in (0, 1):
        assert _nbytes(short, short.working_set(True)[phase]) == _nbytes(long, long.working_set(True)[phase])
        assert _nbytes(short, short.working_set(False)[phase]) < _nbytes(long, long.working_set(False)[phase])
    wider = ChunkGeometry(seq_len=4096, ulysses=1, ring=4, chunk_size=64)
    assert _nbytes(wider, wider.working_set(True)[1]) > _nbytes(long, long.working_set(True)[1])
    forward, backward = long.working_set(True)
    assert forward.per_chunk_kv == forward.per_chunk_q == backward.per_chunk_acc_kv == 0


def _predicted(g: ChunkGeometry, offload: bool, batch: int, heads: int, kv_heads: int, head_dim: int):
    return [ws.nbytes(batch=batch, chunk_tokens=g.chunk_tokens, heads=heads // g.ulysses,
                      kv_heads=max(1, kv_heads // g.ulysses), head_dim=head_dim, chunks=g.chunks, ring=g.ring,
                      itemsize=2) for ws in g.working_set(offload)]


# (batch, heads, kv_heads, chunks, offload): GQA and MHA, without offload from 2 chunks, with offload from the
# chunk count where every middle chunk's K/V and saved chunks come back from the host
ONE_RANK = [(1, 6, 2, 2, False), (2, 4, 4, 5, False), (1, 6, 2, OFFLOAD_STEADY_CHUNKS, True),
            (2, 4, 4, OFFLOAD_STEADY_CHUNKS + 1, True)]


@pytest.mark.parametrize("batch,heads,kv_heads,chunks,offload", ONE_RANK,
                         ids=[f"b{b}-h{h}-kv{k}-n{n}-{'offload' if o else 'device'}" for b, h, k, n, o in ONE_RANK])
def test_the_working_set_is_the_peak_of_the_buffers_chunked_attention_holds(batch, heads, kv_heads, chunks,
                                                                           offload):
    """Forward and backward peaks of the tensors the code allocates beside its inputs and outputs (bf16, the
    kernel's workspace hidden), byte for byte: the counts cannot drift from the code."""
    C, D = 16, 8
    g = ChunkGeometry(seq_len=C * chunks, ulysses=1, ring=1, chunk_size=C)
    forward, backward, pool_allocations = measured_working_set(
        1, 1, batch=batch, seq_len=C * chunks, heads=heads, kv_heads=kv_heads, head_dim=D, chunk_size=C,
        offload=offload)
    assert pool_allocations == 0  # a warm pool: the host buffers are not counted
    assert [forward, backward] == _predicted(g, offload, batch, heads, kv_heads, D)


def test_with_offload_fewer_chunks_hold_less_than_the_steady_working_set():
    C, D = 16, 8
    for chunks in (2, OFFLOAD_STEADY_CHUNKS - 1):
        g = ChunkGeometry(seq_len=C * chunks, ulysses=1, ring=1, chunk_size=C)
        measured = measured_working_set(1, 1, batch=1, seq_len=C * chunks, heads=6, kv_heads=2, head_dim=D,
                                        chunk_size=C, offload=True)[:2]
        assert all(m <= p for m, p in zip(measured, _predicted(g, True, 1, 6, 2, D))), chunks


SPLIT = [(2, 1), (1, 2)]


@pytest.mark.parametrize("ulysses,ring", SPLIT, ids=[f"u{u}-r{r}" for u, r in SPLIT])
def test_on_two_ranks_the_working_set_holds_the_measured_peaks(dist_pools, ulysses, ring):
    """Ulysses: the all-to-all buffers are counted exactly; gloo may release a finished all-to-all's buffers
    a moment after the code drops them, so a rank may measure up to two query chunks more. Ring: each peer's
    blocks are counted as whole chunks (upper bounds), so the measured peaks are at most the counted ones."""
    C, D, H, Hkv = 16, 8, 6, 2
    configs = [(1, C * n * ring, H, Hkv, D, C, offload) for n, offload in
               ((4, False), (8, False), (OFFLOAD_STEADY_CHUNKS, True))]
    per_rank = dist_pools(2).run(tests_geometry_cases.measured_working_sets, ulysses, ring, configs)
    for (B, S, _, _, _, _, offload), *measured in zip(configs, *per_rank):
        g = ChunkGeometry(seq_len=S, ulysses=ulysses, ring=ring, chunk_size=C)
        predicted = _predicted(g, offload, B, H, Hkv, D)
        q_chunk = B * C * (H // ulysses) * D * 2
        for rank, (forward, backward, _) in enumerate(measured):
            for phase, got, want in (("forward", forward, predicted[0]), ("backward", backward, predicted[1])):
                if ulysses > 1:
                    assert 0 <= got - want <= 2 * q_chunk, (rank, S, offload, phase, got, want)
                else:
                    assert got <= want, (rank, S, offload, phase, got, want)


def test_the_geometry_needs_no_process_group_or_topology():
    code = ("import sys; from ds_longctx.geometry import ChunkGeometry; "
            "g = ChunkGeometry(seq_len=1 << 20, ulysses=8, ring=4, chunk_size=1 << 15); g.working_set(True); "
            "g.block(1, 2, 3, 4); assert 'ds_longctx.topology' not in sys.modules; "
            "import torch.distributed as d; assert not d.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
