"""A pool of gloo worker processes that stays up for the whole test session.

Spawning ``N`` Python processes that import torch costs seconds; starting one pool per world size and
sending it jobs keeps the many distributed cases cheap. A job is a module-level function (picklable by
name) that every rank runs with the same arguments; ``run`` returns the per-rank results in rank order,
re-raises any rank's exception with its traceback, and fails instead of hanging when a rank never answers.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import traceback
from multiprocessing.reduction import ForkingPickler


def _worker(rank, world, init_file, jobs, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    parent = os.getppid()
    while True:
        try:
            job = jobs.get(timeout=5)
        except queue.Empty:
            # A killed test session cannot close its pool; orphaned, the gloo loops of a worker keep a core
            # busy, so a worker whose parent is gone exits by itself.
            if os.getppid() != parent:
                os._exit(0)
            continue
        if job is None:
            break
        fn, args, kwargs = job
        # What earlier jobs left alive (imported modules, caches) is set aside from the collector: a full
        # collection, which DeepSpeed runs at every engine's start, then scans only this job's objects
        gc.collect()
        gc.freeze()
        try:
            value = fn(*args, **kwargs)
            # The queue pickles in a background thread, where a failure is only printed and the test would
            # wait for a result that never comes: pickle here, so that it fails as this job's error.
            ForkingPickler.dumps(value)
            results.put((rank, True, value))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="dslc_pool_")
        init_file = os.path.join(self._dir, "init")
        self._jobs = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, self._jobs[r], self._results),
                                   daemon=True) for r in range(world_size)]
        for p in self._procs:
            p.start()
        self.alive = True

    def run(self, fn, *args, timeout: float = 300.0, **kwargs):
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if not self.alive:
            raise RuntimeError("the pool was closed after an earlier failure")
        for q in self._jobs:
            q.put((fn, args, kwargs))
        got = {}
        errors = {}
        while len(got) + len(errors) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close(force=True)
                missing = sorted(set(range(self.world_size)) - set(got) - set(errors))
                detail = "".join(f"\n--- rank {r} raised ---\n{e}" for r, e in sorted(errors.items()))
                raise TimeoutError(f"ranks {missing} did not finish {fn.__name__} within {timeout}s "
                                   f"(a hang){detail}") from None
            (got if ok else errors)[rank] = value
        if errors:
            detail = "".join(f"\n--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}:{detail}")
        return [got[r] for r in range(self.world_size)]

    def close(self, force: bool = False):
        if not self.alive:
            return
        self.alive = False
        if not force:
            for q in self._jobs:
                q.put(None)
            for p in self._procs:
                p.join(timeout=20)
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=20)
        shutil.rmtree(self._dir, ignore_errors=True)
