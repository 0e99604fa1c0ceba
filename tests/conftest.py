import pytest

from tests.distpool import DistPool

_POOLS = {}


@pytest.fixture(scope="session")
def dist_pools():
    """``dist_pools(n)``: a live pool of ``n`` gloo ranks, started once per session and world size."""

    def get(world_size: int) -> DistPool:
        pool = _POOLS.get(world_size)
        if pool is None or not pool.alive:
            pool = _POOLS[world_size] = DistPool(world_size)
        return pool

    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


@pytest.fixture(scope="module", autouse=True)
def _release_pool_topologies():
    """After each module, the pools' workers drop the process groups its tests built: idle groups keep
    gloo loop threads waking, which slowed the subprocess and DeepSpeed tests later in the session."""
    yield
    from tests.dist_cases import release_topologies

    for pool in _POOLS.values():
        if pool.alive:
            pool.run(release_topologies, timeout=60)
