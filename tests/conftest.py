import pytest

from tests.distpool import DistPool


@pytest.fixture(scope="session")
def dist_pools():
    """``dist_pools(n)``: a live pool of ``n`` gloo ranks, started once per session and world size."""
    pools = {}

    def get(world_size: int) -> DistPool:
        pool = pools.get(world_size)
        if pool is None or not pool.alive:
            pool = pools[world_size] = DistPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.close()
