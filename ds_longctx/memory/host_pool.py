"""A pool of (pinned) host buffers for K/V offload, allocated once and reused across layers and steps.

``cudaHostAlloc`` is slow (it pins pages) and pinned memory is a scarce system resource, so buffers are
never freed between steps: a layer's forward leases the buffers it needs, its backward hands them back,
and the next layer (or the next step's same layer) leases the same buffers again. The pool therefore
grows to the peak of simultaneously leased bytes (all layers' saved chunks of one step) during the first
step and stays there. :meth:`HostPool.release` (or leaving a ``with pool:`` block, or interpreter exit)
frees every idle buffer. Without CUDA the buffers are ordinary host tensors: the same schedule runs on CPU.

With CUDA, pinned buffers are page-locked exactly (:mod:`.pinned`: whole pages, registered with
``cudaHostRegister``), not taken from torch's host allocator, which would round each one up to a power of two
(a 1.5 GiB checkpoint would lock 2 GiB). The pool counts the bytes it locks, so ``limit_bytes`` bounds what the
process really pins for offload.
"""
from __future__ import annotations

import atexit
import math
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import pinned as pinned_memory

Key = Tuple[Tuple[int, ...], torch.dtype, bool]


class HostMemoryError(MemoryError):
    """Host (pinned) memory for the offload buffers could not be had; the message says how much."""


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class HostPool:
    """Buffers keyed by ``(shape, dtype, pinned)``; idle ones are handed out again before anything is allocated.

    Byte counts are what the buffers occupy: for a page-locked buffer the locked bytes (whole pages).

    Args:
        limit_bytes: refuse to hold more than this many bytes in all (``None``: whatever the allocator gives).
    """

    def __init__(self, limit_bytes: Optional[int] = None):
        self.limit_bytes = limit_bytes
        # idle buffers with the events of the last copies that touched them: a buffer handed back while its
        # copy is in flight waits for it only when it is handed out again (or freed), not when it comes back
        self._idle: Dict[Key, List[Tuple[torch.Tensor, Tuple]]] = {}
        self._locked: Dict[int, pinned_memory.PinnedBuffer] = {}  # by data_ptr: the registered buffers held
        self.held_bytes = 0        # allocated and not yet released, idle or leased
        self.leased_bytes = 0
        self.allocations = 0       # number of host allocations ever made (stays flat once warm)
        self._released = False     # after release(), buffers handed back are freed instead of kept idle

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """A host tensor ``shape``/``dtype`` (pinned when ``pin``), an idle one if one matches; contents undefined.

        Raises :class:`HostMemoryError` naming the bytes needed when the limit or the allocator refuses."""
        key = (tuple(int(d) for d in shape), dtype, bool(pin))
        idle = self._idle.get(key)
        if idle:
            buf, pending = idle.pop()
            _wait(pending)
        else:
            buf = self._allocate(key)
        self.leased_bytes += self._occupied(buf)
        return buf

    def _allocate(self, key: Key) -> torch.Tensor:
        shape, dtype, pin = key
        exact = pin and pinned_memory.can_register()
        nbytes = _nbytes(shape, dtype)
        needed = pinned_memory.page_round(nbytes) if exact else nbytes
        what = "pinned host" if pin else "host"
        if self.limit_bytes is not None and self.held_bytes + needed > self.limit_bytes:
            raise HostMemoryError(
                f"offload needs {needed} more bytes ({needed / 2**30:.3f} GiB) of {what} memory for a "
                f"{list(shape)} {dtype} buffer, but the pool is limited to {self.limit_bytes} bytes and "
                f"already holds {self.held_bytes}; raise the limit, shorten the sequence per rank (more "
                f"ulysses/ring ranks), or use offload=False")
        try:
            if exact:
                record = pinned_memory.pin_exact(shape, dtype)
                buf = record.tensor
                self._locked[buf.data_ptr()] = record
            else:
                buf = torch.empty(shape, dtype=dtype, pin_memory=pin)
        except (RuntimeError, MemoryError) as exc:
            raise HostMemoryError(
                f"could not allocate {needed} bytes ({needed / 2**30:.3f} GiB) of {what} memory for a "
                f"{list(shape)} {dtype} offload buffer (the pool already holds {self.held_bytes} bytes, "
                f"{self.leased_bytes} of them in use): free host memory, shorten the sequence per rank "
                f"(more ulysses/ring ranks), or use offload=False. Allocator said: {exc}") from exc
        self.allocations += 1
        self.held_bytes += needed
        return buf

    def _occupied(self, buf: torch.Tensor) -> int:
        record = self._locked.get(buf.data_ptr())
        return record.locked_bytes if record is not None else buf.numel() * buf.element_size()

    def _drop(self, buf: torch.Tensor) -> None:
        """Stop holding ``buf`` (no copy may still use it): unlock its pages if it was registered."""
        self.held_bytes -= self._occupied(buf)
        record = self._locked.pop(buf.data_ptr(), None)
        if record is not None:
            record.unregister()

    def give_back(self, buffers: Sequence[torch.Tensor], pinned: Sequence[bool], pending: Sequence = ()) -> None:
        """Return leased buffers. ``pending``: events of the last copies touching them (each the latest of its
        stream); the buffers are reused or freed only once those are done, and the caller does not wait."""
        pending = tuple(pending)
        for buf, pin in zip(buffers, pinned):
            self.leased_bytes -= self._occupied(buf)
            if self._released:
                _wait(pending)
                self._drop(buf)  # released while leased: drop it now instead of keeping it idle
                continue
            self._idle.setdefault((tuple(buf.shape), buf.dtype, pin), []).append((buf, pending))

    def lease(self) -> "Lease":
        """A group of buffers handed back together (by :meth:`Lease.release` or when the lease is collected)."""
        self._released = False
        return Lease(self)

    def release(self) -> None:
        """Free every idle buffer; buffers still leased are freed when their lease ends."""
        for bufs in self._idle.values():
            for buf, pending in bufs:
                _wait(pending)
                self._drop(buf)
        self._idle.clear()
        self._released = True

    @property
    def idle_bytes(self) -> int:
        return self.held_bytes - self.leased_bytes

    @property
    def locked_bytes(self) -> int:
        """Bytes of the held buffers that are page-locked through :mod:`.pinned` (0 without CUDA)."""
        return sum(r.locked_bytes for r in self._locked.values())

    def __enter__(self) -> "HostPool":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"HostPool(held={self.held_bytes} B, leased={self.leased_bytes} B, "
                f"allocations={self.allocations}, limit={self.limit_bytes})")


def _wait(events) -> None:
    """Block until these copies are done (a copy may still read or write the buffer): waits on those copies
    only, never the device."""
    for ev in events:
        ev.synchronize()


def _return(pool_ref, buffers, pinned, events):
    pool = pool_ref()
    if pool is None:
        _wait(events.values())
        return
    # the copies may still run: the pool waits for them when it hands the buffers out again, so the host does
    # not stall here (at the end of a layer's backward) while the GPU's queue drains
    pool.give_back(buffers, pinned, pending=events.values())


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
