"""Peak bytes of the tensors a piece of code allocates and keeps alive, on any device (CPU included).

A :class:`LiveTensors` dispatch mode sees every tensor an operator returns; a storage no input of that
operator already owned is a new allocation, and a weak reference on the storage sees it freed. The peak
is taken over the recorded allocations and frees, leaving out the storages named afterwards (the
tensors a call returns to its caller): the peak of what the code holds beside its inputs and outputs.
The host pool's buffers are allocated before a measured call (a warm pool), so only the device copies
count. :class:`OpaqueKernel` hides a kernel's internal workspace (a CPU reference kernel's scores are not
a flash kernel's): only the tensors it returns count, as fresh allocations.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Dict, Iterable, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ds_longctx.kernels.base import Kernel


def _storage_ptrs(values) -> set:
    ptrs = set()
    for t in tree_flatten(values)[0]:
        if isinstance(t, torch.Tensor):
            ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


class LiveTensors(TorchDispatchMode):
    """Records every new storage (its bytes) and when it is freed, while the mode is active."""

    def __init__(self):
        super().__init__()
        self.events: List[Tuple[int, int]] = []  # (allocation id, +bytes or -bytes)
        self._live: Dict[int, int] = {}  # data_ptr -> allocation id of the live storage there
        self._ids = itertools.count()
        self._paused = 0

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        inputs = _storage_ptrs((args, kwargs))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._register(t, inputs)
        return out

    def _register(self, t: torch.Tensor, inputs: set) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in inputs or ptr in self._live:
            return
        ident = next(self._ids)
        self._live[ptr] = ident
        self.events.append((ident, nbytes))
        weakref.finalize(storage, self._free, ptr, ident, nbytes)

    def _free(self, ptr: int, ident: int, nbytes: int) -> None:
        if self._live.get(ptr) == ident:
            del self._live[ptr]
        self.events.append((ident, -nbytes))

    def ids_of(self, tensors: Iterable[torch.Tensor]) -> set:
        """Allocation ids of the (live) storages of ``tensors``."""
        return {self._live[p] for p in _storage_ptrs(list(tensors)) if p in self._live}

    def live(self, excluding: Iterable[torch.Tensor] = ()) -> int:
        """Bytes of the new storages still alive, without those of ``excluding``."""
        skip = self.ids_of(excluding)
        return sum(delta for ident, delta in self.events if ident not in skip)

    def peak(self, excluding: Iterable[torch.Tensor] = ()) -> int:
        """The largest sum of simultaneously live new storages, without those of ``excluding``."""
        skip = self.ids_of(excluding)
        now = best = 0
        for ident, delta in self.events:
            if ident in skip:
                continue
            now += delta
            best = max(best, now)
        return best


class OpaqueKernel(Kernel):
    """``inner`` with its workspace hidden from ``tracker``: its results count as fresh allocations, in the
    dtypes a flash kernel returns (output and gradients in the input dtype, lse in fp32)."""

    def __init__(self, inner: Kernel, tracker: LiveTensors):
        self.inner, self.tracker, self.name = inner, tracker, f"opaque({inner.name})"

    def available(self) -> bool:
        return True

    def forward(self, q, k, v, causal, scale):
        with self.tracker.paused():
            out, lse = self.inner.forward(q, k, v, causal, scale)
        return out.to(q.dtype, copy=True), lse.to(torch.float32, copy=True)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        with self.tracker.paused():
            grads = self.inner.backward(dout, q, k, v, out, lse, causal, scale)
        return tuple(g.to(x.dtype, copy=True) for g, x in zip(grads, (q, k, v)))


__all__ = ["LiveTensors", "OpaqueKernel"]
