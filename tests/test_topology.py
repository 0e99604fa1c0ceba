"""A Topology owns its process groups: destroy() gives them back, and a destroyed one refuses to be used."""
from __future__ import annotations

import os
import time

import pytest


def _threads(window_s: float = 0.5) -> int:
    """The process's threads that persist: the fewest seen over ``window_s``. A leaked group's threads stay for
    good, while gloo's and torch's short-lived workers (a destroyed group's still winding down, or one starting)
    come and go within it: a single reading counted them one time in two on a loaded machine."""
    fewest = len(os.listdir("/proc/self/task"))
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        time.sleep(0.02)
        fewest = min(fewest, len(os.listdir("/proc/self/task")))
    return fewest


def build_and_destroy_repeatedly(ulysses: int, ring: int, times: int) -> dict:
    """Every rank: thread counts after each of ``times`` topologies built, used and destroyed, and what a
    destroyed one says when the attention or a group is asked of it."""
    import torch
    import torch.distributed as dist

    from ds_longctx.attention import attention
    from ds_longctx.topology import Topology, TopologyError

    def used(topo):
        x = torch.ones(8)
        dist.all_reduce(x, group=topo.sp_group)
        dist.all_reduce(x, group=topo.ring_group)
        dist.all_reduce(x, group=topo.ulysses_group)
        return x[0].item()

    with Topology(ulysses=ulysses, ring=ring) as topo:  # the context manager destroys on exit
        total = used(topo)
    assert topo.destroyed
    baseline = _threads()  # after the backend's one-time threads
    counts = []
    for _ in range(times):
        topo = Topology(ulysses=ulysses, ring=ring)
        used(topo)
        topo.destroy()
        counts.append(_threads())
    topo.destroy()  # a second call does nothing
    errors = []
    q = torch.zeros(1, 8 // (ulysses * ring) * 2, 4, 8)
    for ask in (lambda: topo.ring_group, lambda: attention(q, q, q, topo)):
        try:
            ask()
            errors.append(None)
        except TopologyError as exc:
            errors.append(str(exc))
    return {"total": total, "baseline": baseline, "counts": counts, "errors": errors}


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (1, 2)])
def test_destroyed_topologies_leave_no_groups_behind_and_refuse_use(dist_pools, ulysses, ring):
    # Each live gloo group keeps its own threads and connections, and every collective of the process slows
    # down with the number left alive: undestroyed groups slowed this suite's later training cases manyfold.
    results = dist_pools(4).run(build_and_destroy_repeatedly, ulysses, ring, 6, timeout=120)
    for res in results:
        assert res["total"] == (ulysses * ring) ** 2  # summed over sp, then ring, then Ulysses ranks
        assert res["counts"] == [res["baseline"]] * 6
        assert all(e is not None and "destroyed" in e and f"Topology(ulysses={ulysses}, ring={ring})" in e
                   for e in res["errors"]), res["errors"]
    assert len({tuple(r["errors"]) for r in results}) == 1  # the same words on every rank
