"""Checkpoint inputs in pinned host memory between a layer's forward and its recompute in backward.

With activation checkpointing, what a layer leaves on the GPU from forward to backward is its input, one
``[B, S_local, hidden]`` activation per layer: at 512K tokens per rank and hidden 4096 that is 4 GiB a
layer in bf16, 128 GiB for 32 layers, more than the rest of the step together. :class:`CheckpointOffload`
moves those inputs to (pinned) host memory, as FPDT and ALST do: the copy to the host runs on a side stream
while the layer computes, and in backward the recompute of layer ``i`` starts the copy back of layer
``i - 1``'s input, so it arrives while layer ``i``'s backward runs. The GPU then holds at most two layer
inputs whatever the depth, and the copies hide behind compute (a layer's forward and backward take seconds
at these lengths; its input crosses PCIe in tens of milliseconds).

It works through autograd's saved-tensor hooks around the checkpoint call, so both kinds of
``torch.utils.checkpoint`` are served: a non-reentrant checkpoint saves its inputs as saved tensors of the
enclosing graph, a reentrant one through its Function's ``save_for_backward``; the region's own saved tensors
belong to the checkpoint's inner hooks and are never seen. Small saved tensors (masks, positions: under
``min_bytes``) stay where they are. The host buffers come from the :class:`~ds_longctx.memory.host_pool.HostPool`
that FPDT uses, leased per input and returned when the graph lets go of it (after its backward).

Without CUDA the copies are plain host copies: CPU runs the same schedule.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from .chunk_store import HostCopy
from .host_pool import HostPool, default_pool


class _HostCopy(HostCopy):
    """A saved input in host memory, and (weakly) the input saved before it: the next one backward needs."""

    __slots__ = ("previous",)

    def __init__(self, t: torch.Tensor, pool: HostPool, previous: Optional["_HostCopy"]):
        super().__init__(t, pool.lease())
        # weak: a graph that was freed (its backward ran or it was dropped) must not be kept alive by the next
        self.previous = weakref.ref(previous) if previous is not None else None


class CheckpointOffload:
    """Saved-tensor hooks that keep the saved inputs of checkpointed regions in host memory.

    Use :meth:`hooks` around each checkpoint call of a model (``with offload.hooks(): checkpoint(fn, x)``),
    one instance per model: it chains the regions in the order of their forward, which is the reverse of
    the order their backward unpacks them, to prefetch each one a layer ahead.

    Args:
        pool: host buffers (default: the process-wide pool FPDT uses).
        min_bytes: saved tensors smaller than this stay on their device.
        max_regions: offload only the first this many regions of each forward (None: all). Host memory
            rarely holds every layer of a deep model at long sequences; the first layers' inputs wait the
            longest, so they are the ones to move.
    """

    def __init__(self, pool: Optional[HostPool] = None, min_bytes: int = 1 << 20,
                 max_regions: Optional[int] = None):
        self.pool = pool
        self.min_bytes = min_bytes
        self.max_regions = max_regions
        self._last: Optional[weakref.ReferenceType] = None
        self._regions = 0  # regions of the current forward seen so far
        self._backward_seen = False

    def begin_forward(self) -> None:
        """A new forward starts: count its regions from the first (a model's forward pre-hook calls this)."""
        self._regions = 0
        self._backward_seen = False

    def takes_next_region(self) -> bool:
        """Whether the checkpointed region about to run offloads; counts it. A region after a backward
        began belongs to a new forward (for callers without a pre-hook)."""
        if self._backward_seen:
            self.begin_forward()
        self._regions += 1
        return self.max_regions is None or self._regions <= self.max_regions

    def _offloads(self, t: torch.Tensor) -> bool:
        return (t.device.type in ("cuda", "cpu") and t.numel() * t.element_size() >= self.min_bytes
                and not isinstance(t, torch.nn.Parameter) and t.layout == torch.strided)

    def pack(self, t: torch.Tensor):
        if not self._offloads(t):
            return t
        last = self._last() if self._last is not None else None
        copy = _HostCopy(t, self.pool or default_pool(), last)
        self._last = weakref.ref(copy)
        return copy

    def unpack(self, packed):
        self._backward_seen = True
        if not isinstance(packed, _HostCopy):
            return packed
        t = packed.get()
        previous = packed.previous() if packed.previous is not None else None
        if previous is not None:
            previous.prefetch()  # the region whose backward comes next
        # Autograd gives the result the saved tensor's grad_fn / requires_grad. The host copy lives as long as
        # the graph holds the packed object (until its backward is done): a second unpack (retain_graph) finds it.
        return t

    @contextmanager
    def hooks(self) -> Iterator["CheckpointOffload"]:
        """Offload what the graph saves inside this block (around a checkpoint call: the region's inputs)."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self

    def __repr__(self) -> str:
        return f"CheckpointOffload(min_bytes={self.min_bytes}, max_regions={self.max_regions})"


__all__ = ["CheckpointOffload"]
