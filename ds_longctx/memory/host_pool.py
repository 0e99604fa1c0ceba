"""A pool of (pinned) host buffers for K/V offload, allocated once and reused across layers and steps.

``cudaHostAlloc`` is slow (it pins pages) and pinned memory is a scarce system resource, so buffers are
never freed between steps: a layer's forward leases the buffers it needs, its backward hands them back,
and the next layer (or the next step's same layer) leases the same buffers again. The pool therefore
grows to the peak of simultaneously leased bytes (all layers' saved chunks of one step) during the first
step and stays there. :meth:`HostPool.release` (or leaving a ``with pool:`` block, or interpreter exit)
frees every idle buffer. Without CUDA the buffers are ordinary host tensors: the same schedule runs on CPU.
"""
from __future__ import annotations

import atexit
import math
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Key = Tuple[Tuple[int, ...], torch.dtype, bool]


class HostMemoryError(MemoryError):
    """Host (pinned) memory for the offload buffers could not be had; the message says how much."""


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class HostPool:
    """Buffers keyed by ``(shape, dtype, pinned)``; idle ones are handed out again before anything is allocated.

    Args:
        limit_bytes: refuse to hold more than this many bytes in all (``None``: whatever the allocator gives).
    """

    def __init__(self, limit_bytes: Optional[int] = None):
        self.limit_bytes = limit_bytes
        self._idle: Dict[Key, List[torch.Tensor]] = {}
        self.held_bytes = 0        # allocated and not yet released, idle or leased
        self.leased_bytes = 0
        self.allocations = 0       # number of host allocations ever made (stays flat once warm)
        self._released = False     # after release(), buffers handed back are freed instead of kept idle

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """A host tensor ``shape``/``dtype`` (pinned when ``pin``), an idle one if one matches; contents undefined.

        Raises :class:`HostMemoryError` naming the bytes needed when the limit or the allocator refuses."""
        key = (tuple(int(d) for d in shape), dtype, bool(pin))
        nbytes = _nbytes(key[0], dtype)
        idle = self._idle.get(key)
        if idle:
            buf = idle.pop()
        else:
            what = "pinned host" if pin else "host"
            if self.limit_bytes is not None and self.held_bytes + nbytes > self.limit_bytes:
                raise HostMemoryError(
                    f"offload needs {nbytes} more bytes ({nbytes / 2**30:.3f} GiB) of {what} memory for a "
                    f"{list(key[0])} {dtype} buffer, but the pool is limited to {self.limit_bytes} bytes and "
                    f"already holds {self.held_bytes}; raise the limit, shorten the sequence per rank (more "
                    f"ulysses/ring ranks), or use offload=False")
            try:
                buf = torch.empty(key[0], dtype=dtype, pin_memory=bool(pin))
            except (RuntimeError, MemoryError) as exc:
                raise HostMemoryError(
                    f"could not allocate {nbytes} bytes ({nbytes / 2**30:.3f} GiB) of {what} memory for a "
                    f"{list(key[0])} {dtype} offload buffer (the pool already holds {self.held_bytes} bytes, "
                    f"{self.leased_bytes} of them in use): free host memory, shorten the sequence per rank "
                    f"(more ulysses/ring ranks), or use offload=False. Allocator said: {exc}") from exc
            self.allocations += 1
            self.held_bytes += nbytes
        self.leased_bytes += nbytes
        return buf

    def give_back(self, buffers: Sequence[torch.Tensor], pinned: Sequence[bool]) -> None:
        """Return leased buffers (their last device copies must be complete: callers pass ordered events)."""
        for buf, pin in zip(buffers, pinned):
            nbytes = buf.numel() * buf.element_size()
            self.leased_bytes -= nbytes
            if self._released:
                self.held_bytes -= nbytes  # released while leased: drop it now instead of keeping it idle
                continue
            self._idle.setdefault((tuple(buf.shape), buf.dtype, pin), []).append(buf)

    def lease(self) -> "Lease":
        """A group of buffers handed back together (by :meth:`Lease.release` or when the lease is collected)."""
        self._released = False
        return Lease(self)

    def release(self) -> None:
        """Free every idle buffer; buffers still leased are freed when their lease ends."""
        for bufs in self._idle.values():
            for buf in bufs:
                self.held_bytes -= buf.numel() * buf.element_size()
        self._idle.clear()
        self._released = True

    @property
    def idle_bytes(self) -> int:
        return self.held_bytes - self.leased_bytes

    def __enter__(self) -> "HostPool":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"HostPool(held={self.held_bytes} B, leased={self.leased_bytes} B, "
                f"allocations={self.allocations}, limit={self.limit_bytes})")


def _return(pool_ref, buffers, pinned, events):
    for ev in events.values():
        ev.synchronize()  # a copy may still read/write the buffer; waits only on that copy, never the device
    pool = pool_ref()
    if pool is not None:
        pool.give_back(buffers, pinned)


class Lease:
    """Buffers taken from a :class:`HostPool` for one use (one layer's forward + backward)."""

    def __init__(self, pool: HostPool):
        self._buffers: List[torch.Tensor] = []
        self._pinned: List[bool] = []
        self._events: dict = {}  # the last copy event per stream: copies on one stream finish in order
        self.pool = pool
        # A forward whose backward never runs (eval, a dropped graph) still returns its buffers.
        self._finalizer = weakref.finalize(self, _return, weakref.ref(pool), self._buffers, self._pinned,
                                           self._events)

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        buf = self.pool.acquire(shape, dtype, pin)
        self._buffers.append(buf)
        self._pinned.append(bool(pin))
        return buf

    def after(self, event, stream) -> None:
        """Hand the buffers back only once ``event``, the latest copy on ``stream`` touching them, is done."""
        if event is not None:
            self._events[stream] = event

    def release(self) -> None:
        """Return the buffers to the pool now (idempotent)."""
        self._finalizer()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)


_DEFAULT: Optional[HostPool] = None


def default_pool() -> HostPool:
    """The process-wide pool that :func:`ds_longctx.attention.attention` uses for ``offload=True``."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = HostPool()
    return _DEFAULT


@atexit.register
def _release_default():
    if _DEFAULT is not None:
        _DEFAULT.release()


__all__ = ["HostMemoryError", "HostPool", "Lease", "default_pool"]
