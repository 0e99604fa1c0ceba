"""A Topology owns its process groups: destroy() gives them back, and a destroyed one refuses to be used."""
from __future__ import annotations

import pytest

from tests.threads import persistent_threads


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
    baseline = persistent_threads()  # after the backend's one-time threads
    counts = []
    for _ in range(times):
        topo = Topology(ulysses=ulysses, ring=ring)
        used(topo)
        topo.destroy()
        counts.append(persistent_threads())
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
