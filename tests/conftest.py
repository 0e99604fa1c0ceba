import gc

import pytest

from tests.distpool import DistPool

_POOLS = {}


def pytest_collection_finish(session):
    """The test modules' imports (torch, transformers, DeepSpeed) are set aside from the collector: a full
    collection then scans only what the tests create (transformers and DeepSpeed run full collections)."""
    gc.collect()
    gc.freeze()


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


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer_"


def _files_in_use() -> set:
    """Paths some live process holds open or mapped (what /proc shows of them)."""
    import os

    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            with open(f"/proc/{pid}/maps") as maps:
                held.update(line.split(None, 5)[5].strip() for line in maps if line.count(" ") >= 5 and "/" in line)
        except (OSError, IndexError):  # gone, or not ours to read
            continue
    return held


@pytest.fixture(scope="session", autouse=True)
def _remove_orphaned_deepspeed_shm_buffers():
    """DeepSpeed's CPU all-reduce maps a buffer per rank in /dev/shm (70 MB each) that a rank killed on purpose
    (the resume and watch tests kill ranks) never unlinks; left there, every session leaves about 1 GB of RAM
    behind. At the end, remove the ones no live process holds."""
    import os

    before = set(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else set()
    yield
    if not os.path.isdir(SHM_DIR):
        return
    held = _files_in_use()
    for name in set(os.listdir(SHM_DIR)) - before:
        path = os.path.join(SHM_DIR, name)
        if name.startswith(SHM_PREFIX) and path not in held:
            try:
                os.unlink(path)
            except OSError:
                pass
