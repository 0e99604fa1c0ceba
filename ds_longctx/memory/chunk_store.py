"""Per-chunk storage of tensors for the FPDT pipeline: on the device, or offloaded to (pinned) host memory.

With offload, :meth:`ChunkStore.put` copies a chunk to its host slot on a device->host side stream and
:meth:`ChunkStore.fetch` copies it back on a host->device side stream, so both overlap the attention
kernels on the compute stream. Ordering uses CUDA events only (``wait_stream``/``wait_event`` and
``record_stream`` for the caching allocator), never a device-wide synchronization. The pipeline keeps at
most two fetched chunks of a store alive (the one in use and the prefetched one): the two device slots
of double buffering are the allocator blocks of those two, which ``record_stream`` keeps from being
reused before the copies and kernels that touch them are done. The most recently stored chunk stays
resident on the device until the next ``put``, so a chunk used right after it is produced (the causal
diagonal) is not copied back from the host.

Without CUDA the streams and events vanish and the copies are plain copies: CPU runs the same schedule.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .host_pool import Lease

Spec = Tuple[Tuple[int, ...], torch.dtype]


class OffloadStreams:
    """The two side streams of one CUDA device: ``d2h`` (offload) and ``h2d`` (prefetch, P2P issue)."""

    _by_device: Dict[int, "OffloadStreams"] = {}

    def __init__(self, device: torch.device):
        self.device = device
        self.d2h = torch.cuda.Stream(device=device)
        self.h2d = torch.cuda.Stream(device=device)

    @classmethod
    def of(cls, device: torch.device) -> Optional["OffloadStreams"]:
        """The device's streams (created once), or ``None`` off CUDA."""
        if device.type != "cuda":
            return None
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in cls._by_device:
            cls._by_device[idx] = cls(torch.device("cuda", idx))
        return cls._by_device[idx]


def side_stream(streams: Optional[OffloadStreams]):
    """Context that makes the prefetch stream current (a no-op off CUDA)."""
    return torch.cuda.stream(streams.h2d) if streams is not None else contextlib.nullcontext()


class Fetched:
    """Device copies of one chunk, possibly still in flight on the prefetch stream."""

    __slots__ = ("tensors", "event")

    def __init__(self, tensors: Sequence[torch.Tensor], event=None):
        self.tensors, self.event = tuple(tensors), event

    def use(self) -> Tuple[torch.Tensor, ...]:
        """The tensors, ordered after their copy on the current stream (which may be a side stream)."""
        if self.event is not None:
            stream = torch.cuda.current_stream(self.tensors[0].device)
            stream.wait_event(self.event)
            for t in self.tensors:
                t.record_stream(stream)
        return self.tensors


def _compact(t: torch.Tensor) -> bool:
    """Whether ``t`` is the only thing its storage holds."""
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


class ChunkStore:
    """``n`` chunks, each a tuple of tensors of fixed ``specs`` (shape, dtype), kept on ``device`` or offloaded.

    Args:
        n: number of chunks.
        specs: shape and dtype of each tensor of a chunk.
        device: where the chunks are used.
        lease: host buffers come from it when offloading (``None``: keep the chunks on the device).
    """

    def __init__(self, n: int, specs: Sequence[Spec], device: torch.device, lease: Optional[Lease]):
        self.n, self.specs, self.device = n, list(specs), device
        self.offload = lease is not None
        self.streams = OffloadStreams.of(device) if self.offload else None
        self._stored: List[Optional[Tuple[torch.Tensor, ...]]] = [None] * n  # device copies (no offload)
        self._written = [False] * n
        self._ready: List[object] = [None] * n           # event: host copy complete
        self._inflight: Dict[int, Fetched] = {}
        self._resident: Optional[Tuple[int, Tuple[torch.Tensor, ...]]] = None
        self._lease = lease
        if self.offload:
            pin = device.type == "cuda"
            # One host buffer per tensor kind holding all chunks: few, large, reusable allocations.
            self._host = [lease.acquire((n,) + tuple(shape), dtype, pin) for shape, dtype in self.specs]

    def has(self, j: int) -> bool:
        return self._written[j]

    def put(self, j: int, tensors: Sequence[torch.Tensor], resident: bool = True) -> None:
        """Store chunk ``j`` (device tensors matching the specs). With offload the copy to the host is async,
        and the chunk stays on the device until the next ``put`` unless ``resident=False``."""
        tensors = tuple(tensors)
        self._written[j] = True
        self._inflight.pop(j, None)  # a stale prefetch of the old contents
        if not self.offload:
            self._stored[j] = tensors
            return
        s = self.streams
        if s is None:
            for h, t in zip(self._host, tensors):
                h[j].copy_(t)
        else:
            s.d2h.wait_stream(torch.cuda.current_stream(self.device))  # the chunk is produced on the compute stream
            with torch.cuda.stream(s.d2h):
                for h, t in zip(self._host, tensors):
                    h[j].copy_(t, non_blocking=True)
                    t.record_stream(s.d2h)
                self._ready[j] = torch.cuda.Event()
                self._ready[j].record(s.d2h)
            self._lease.after(self._ready[j], s.d2h)
        # A chunk may be a view into a whole input (with one Ulysses rank the all-to-all is a slice): keeping
        # the view resident would keep that whole input alive, so keep a compact copy of the chunk instead.
        self._resident = (j, tuple(t if _compact(t) else t.clone() for t in tensors)) if resident else None

    def evict(self) -> None:
        """Drop the device copy of the most recently stored chunk (with offload its host copy remains; the copy's
        ``record_stream`` keeps the device memory from reuse until the copy is done)."""
        if self.offload:
            self._resident = None

    def prefetch(self, j: int) -> None:
        """Start copying chunk ``j`` back to the device (nothing to do when it is on the device already)."""
        if not self.offload or j in self._inflight or (self._resident and self._resident[0] == j):
            return
        if not self._written[j]:
            raise RuntimeError(f"chunk {j} fetched before it was stored (schedule bug)")
        s = self.streams
        if s is None:
            # The "device slot" is a fresh tensor, as on CUDA: no aliasing of the host copy.
            self._inflight[j] = Fetched([h[j].clone() for h in self._host])
            return
        with torch.cuda.stream(s.h2d):
            s.h2d.wait_event(self._ready[j])
            # Allocated on h2d, whose earlier uses of recycled blocks are already ordered before this copy.
            out = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.specs]
            for o, h in zip(out, self._host):
                o.copy_(h[j], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s.h2d)
        self._lease.after(ev, s.h2d)
        self._inflight[j] = Fetched(out, ev)

    def fetch(self, j: int) -> Fetched:
        """Chunk ``j`` on the device (call :meth:`Fetched.use` on the stream that reads it)."""
        if not self.offload:
            if self._stored[j] is None:
                raise RuntimeError(f"chunk {j} fetched before it was stored (schedule bug)")
            return Fetched(self._stored[j])
        if self._resident is not None and self._resident[0] == j:
            return Fetched(self._resident[1])
        self.prefetch(j)
        return self._inflight.pop(j)

    def close(self) -> None:
        """Drop every device reference (the host buffers go back with the lease)."""
        self._stored = [None] * self.n
        self._inflight.clear()
        self._resident = None


class HostCopy:
    """One device tensor kept in (pinned) host memory from ``lease``: copied out now on the offload stream,
    brought back by :meth:`get` (after a :meth:`prefetch`, already in flight). The host buffer goes back with
    the lease, when the copy is dropped."""

    __slots__ = ("store", "__weakref__")

    def __init__(self, t: torch.Tensor, lease: Lease):
        self.store = ChunkStore(1, [(tuple(t.shape), t.dtype)], t.device, lease)
        self.store.put(0, (t.detach(),), resident=False)

    def prefetch(self) -> None:
        self.store.prefetch(0)

    def get(self) -> torch.Tensor:
        """The tensor on its device, ordered after its copy on the current stream."""
        (t,) = self.store.fetch(0).use()
        return t


__all__ = ["ChunkStore", "Fetched", "HostCopy", "OffloadStreams", "side_stream"]
