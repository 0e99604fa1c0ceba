"""A rank that raises, dies (SIGKILL) or hangs makes every other rank stop within the block's timeout, with a
message naming that rank and what it was doing; never a silent hang (3 gloo processes, ring attention)."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import time

import pytest

TIMEOUT_S = 2.0
CULPRIT, FAIL_STEP = 1, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, mode: str, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import datetime

    import torch
    import torch.distributed as dist

    from ds_longctx.attention import attention
    from ds_longctx.integration.watch import RankFailure, RankWatch
    from ds_longctx.layout import shard
    from ds_longctx.topology import Topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    topo = Topology(ulysses=1, ring=world, timeout_s=TIMEOUT_S)
    watch = RankWatch(TIMEOUT_S)
    q = torch.randn(1, 12 * world, 2, 8, generator=torch.Generator().manual_seed(0))
    started = None
    try:
        for step in range(4):
            with watch.during(f"step {step}: ring attention"):
                started = time.monotonic()
                if rank == CULPRIT and step == FAIL_STEP:
                    if mode == "raises":
                        raise ValueError("a bad batch on this rank")
                    if mode == "dies":
                        os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(600)  # hangs
                x = shard(q, topo).requires_grad_()
                attention(x, x, x, topo, causal=True).sum().backward()
        results.put((rank, "finished", None, 0.0))
    except RankFailure as exc:
        results.put((rank, "RankFailure", str(exc), time.monotonic() - started))
    except ValueError as exc:
        results.put((rank, "ValueError", str(exc), time.monotonic() - started))


@pytest.mark.parametrize("mode", ["raises", "dies", "hangs"])
def test_a_failing_rank_stops_every_other_rank_within_the_timeout_naming_it(mode):
    world, port = 3, _free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, mode, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        survivors = [r for r in range(world) if r != CULPRIT]
        deadline = time.monotonic() + 120  # process start and imports included; the bound is checked below
        while len([r for r in got if r in survivors]) < len(survivors):
            try:
                rank, kind, message, elapsed = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"ranks {sorted(set(survivors) - set(got))} never stopped ({mode}): a hang; got {got}")
            got[rank] = (kind, message, elapsed)
    finally:
        for p in procs:
            p.join(timeout=1 if mode != "hangs" else 0)
            if p.is_alive():
                p.kill()
    for rank in survivors:
        kind, message, elapsed = got[rank]
        assert kind == "RankFailure", (rank, got[rank])
        # the failed or silent rank, what it was doing, and for an exception the exception itself
        assert f"rank {CULPRIT} " in message and f"step {FAIL_STEP}: ring attention" in message, message
        if mode == "raises":
            assert "raised" in message and "ValueError: a bad batch on this rank" in message, message
        else:
            assert "went silent while" in message, message
        # the collective's timeout plus at most as long again waiting for the other ranks' records
        assert elapsed < 2 * TIMEOUT_S + 1.5, (rank, elapsed, message)
    if mode == "raises":
        assert got[CULPRIT][0] == "ValueError"  # the failing rank's own error is left as it was


def test_timeout_s_is_a_positive_number_of_seconds_in_the_block_and_the_topology():
    from ds_longctx.config import LongContextConfig, LongContextConfigError
    from ds_longctx.topology import Topology, TopologyError

    assert LongContextConfig.from_block({"timeout_s": 600}).timeout_s == 600.0
    assert LongContextConfig.from_block({}).timeout_s is None
    for bad in (0, -1, "600", True):
        with pytest.raises(LongContextConfigError, match="long_context.timeout_s"):
            LongContextConfig.from_block({"timeout_s": bad})
    with pytest.raises(TopologyError, match="timeout_s"):
        Topology(timeout_s=0)


def test_nccl_error_handling_env_sets_what_pytorch_needs_and_keeps_the_users_choice(monkeypatch):
    from ds_longctx.integration.watch import nccl_error_handling_env

    for key in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "100")
    assert nccl_error_handling_env() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "100"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    with pytest.warns(UserWarning, match="waiting forever"):
        nccl_error_handling_env()
