"""Rematerialization-aware checkpointing (``ds_longctx.memory.remat``): a checkpointed region keeps its
attention output instead of running the attention again in backward, with the gradients of the plain run;
FPDT chunks are built once, by the recompute, not kept from forward to backward."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist

from ds_longctx.attention import attention
from ds_longctx.memory.attention_stash import AttentionStashError, StashedCall
from ds_longctx.memory.remat import checkpoint
from ds_longctx.topology import Topology
from tests import dist_cases

TOL = 1e-5
FACTORIZATIONS_OF_4 = [(u, r) for u in (1, 2, 4) for r in (1, 2, 4) if 4 % (u * r) == 0]
# (chunk_size as a fraction of the group sequence, offload): plain hybrid, FPDT chunks, FPDT with host offload
PATHS = {"hybrid": (None, False), "fpdt": (2, False), "fpdt_offload": (2, True)}


def check_checkpointed(results, out_bytes, offload=False):
    for rank, res in enumerate(results):
        for name, err in res["reference"].items():
            assert err < TOL, f"rank {rank}: plain {name} vs float64 reference {err:.3g}"
        plain = res["plain"]["forwards"]
        assert plain > 0
        kept = ("keep", "keep_reentrant", "keep_offloaded", "keep_offloaded_reentrant")
        for mode in kept + ("recompute",):
            for name, err in res[mode]["vs_plain"].items():
                assert err < TOL, f"rank {rank} {mode}: {name} vs the plain run {err:.3g}"
        # kept: no kernel runs forward again in backward; recomputed: every one does
        assert all(res[mode]["forwards"] == plain for mode in kept)
        assert res["recompute"]["forwards"] == 2 * plain
        # checkpoint offload: the region's inputs and its kept output wait in host memory until backward
        for mode in ("keep_offloaded", "keep_offloaded_reentrant"):
            assert res[mode]["leased_after_forward"] == res["input_bytes"] + out_bytes, (rank, mode, res[mode])
        if offload:
            # the plain run holds its offloaded chunks until backward; a checkpointed forward holds none, and
            # a kept output waits in host memory: exactly one output's bytes stay leased
            assert res["plain"]["leased_after_forward"] > 0
            for mode, held in (("keep", out_bytes), ("keep_reentrant", out_bytes), ("recompute", 0)):
                assert res[mode]["leased_after_forward"] == held, (rank, mode, res[mode])
        for mode in ("plain", "recompute") + kept:
            assert res[mode]["leased_after_backward"] == 0, (rank, mode, res[mode])  # every host buffer back


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ulysses,ring", FACTORIZATIONS_OF_4, ids=[f"u{u}-r{r}" for u, r in FACTORIZATIONS_OF_4])
def test_checkpoint_keeps_the_attention_output_and_the_gradients(dist_pools, ulysses, ring, path):
    S = 16 * ulysses * ring
    parts, offload = PATHS[path]
    chunk_size = None if parts is None else S // ring // parts
    B, H, D = 2, 4, 8
    results = dist_pools(4).run(dist_cases.checkpointed_attention_vs_plain, ulysses, ring, B, S, H, 2, D,
                                chunk_size=chunk_size, offload=offload, seed=ulysses * 10 + ring)
    check_checkpointed(results, B * S // (ulysses * ring) * H * D * 4, offload)


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (2, 2)])
def test_checkpoint_keeps_the_outputs_of_every_head_chunk_of_a_pipelined_ulysses(dist_pools, ulysses, ring):
    """Head-chunk pipelining: the kept output is split back into its head chunks, each with its own lse."""
    S = 16 * ulysses * ring
    check_checkpointed(dist_pools(4).run(dist_cases.checkpointed_attention_vs_plain, ulysses, ring, 1, S, 8, 4, 8,
                                         seed=5, pipeline_chunks=2), S // (ulysses * ring) * 8 * 8 * 4)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    created = not dist.is_initialized()
    if created:
        init = tmp_path_factory.mktemp("one_rank") / "init"
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield Topology()
    if created:
        dist.destroy_process_group()


def _inputs(S=16):
    torch.manual_seed(0)
    return [torch.randn(1, S, 4, 8, requires_grad=True) for _ in range(3)]


def test_a_recompute_that_calls_the_attention_differently_is_an_error(one_rank):
    calls = {"n": 0}

    def region(q, k, v):
        calls["n"] += 1
        causal = calls["n"] == 1  # not deterministic: the recompute asks for other attention
        return attention(q, k, v, one_rank, causal=causal)

    y = checkpoint(region, *_inputs())
    with pytest.raises(AttentionStashError, match="differs from the forward's"):
        y.sum().backward()


def test_a_recompute_with_more_attention_calls_is_an_error(one_rank):
    calls = {"n": 0}

    def region(q, k, v):
        calls["n"] += 1
        out = attention(q, k, v, one_rank)
        return out if calls["n"] == 1 else out + attention(q, k, v, one_rank)

    # reentrant: the recompute runs the whole region (the non-reentrant one stops once it has what backward reads)
    y = checkpoint(region, *_inputs(), use_reentrant=True)
    with pytest.raises(AttentionStashError, match="more often than its forward"):
        y.sum().backward()


def test_a_kept_output_changed_in_place_is_an_error(one_rank):
    kept = []

    def region(q, k, v):
        out = attention(q, k, v, one_rank)
        kept.append(out)
        return out * 2

    y = checkpoint(region, *_inputs())
    with torch.no_grad():
        kept[0].add_(1)
    with pytest.raises(AttentionStashError, match="modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("chunk_size,offload", [(None, False), (8, False), (8, True)],
                         ids=["hybrid", "fpdt", "fpdt_offload"])
def test_kept_outputs_are_dropped_once_their_layer_is_done_while_the_graph_lives(one_rank, monkeypatch,
                                                                                  chunk_size, offload):
    """A kept output comes back for its layer's recompute; it must not stay on the device until the whole
    graph is freed (the training loop holds the loss, and with it the graph, into the next step)."""
    entries = []
    init = StashedCall.__init__

    def tracked(self, key):
        init(self, key)
        entries.append(weakref.ref(self))

    monkeypatch.setattr(StashedCall, "__init__", tracked)
    h = _inputs()[0]
    for _ in range(3):
        h = checkpoint(lambda x: attention(x, x, x, one_rank, chunk_size=chunk_size, offload=offload) * 2, h)
    h.sum().backward()
    gc.collect()
    assert len(entries) == 3
    assert [e() is None for e in entries] == [True] * 3
