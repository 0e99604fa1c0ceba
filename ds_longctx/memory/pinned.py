"""Page-locked host buffers of exactly the requested size, registered with CUDA instead of allocated by torch.

``torch.empty(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds every request up
to the next power of two (``PowerOf2Ceil`` in ATen's ``CachingHostAllocator.h``, unless ``pinned_max_round_threshold``
is configured): a 1.5 GiB checkpoint locks 2 GiB. Here the buffer is ordinary pageable memory, over-allocated by
one page so that a page-aligned range of whole pages lies inside it, and that range is page-locked with
``cudaHostRegister``. No other allocation shares a registered page, so unregistering never touches anyone
else's memory, and the locked bytes are the requested bytes rounded up to a page.

Registered memory is ``cudaMemoryTypeHost`` to CUDA, so ``tensor.is_pinned()`` is true and ``non_blocking``
copies stay asynchronous. Unregistering happens exactly once: when the owner calls :meth:`PinnedBuffer.unregister`,
or, failing that, when the last tensor viewing the buffer is freed (just before the pages go back to the system).
Callers must not unregister while an asynchronous copy still reads or writes the buffer (the pool waits on the
copies' events first).
"""
from __future__ import annotations

import mmap
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

PAGE_BYTES = mmap.PAGESIZE


class PinError(MemoryError):
    """``cudaHostRegister`` refused to page-lock a buffer; the message says how much and what to change."""


def page_round(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages: what registering a buffer of ``nbytes`` locks."""
    return -(-int(nbytes) // PAGE_BYTES) * PAGE_BYTES


def can_register() -> bool:
    """Whether buffers can be page-locked here (a CUDA device is present)."""
    return torch.cuda.is_available()


def cuda_host_register(ptr: int, nbytes: int) -> int:
    """Page-lock ``[ptr, ptr + nbytes)``; the CUDA error code (0: success)."""
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))


def cuda_host_unregister(ptr: int) -> int:
    """Undo :func:`cuda_host_register` of the range starting at ``ptr``; the CUDA error code (0: success)."""
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


def _error_name(code: int) -> str:
    try:
        cudart = torch.cuda.cudart()
        return cudart.cudaGetErrorString(cudart.cudaError(code))
    except Exception:  # noqa: BLE001 - only the message's wording depends on it
        return f"CUDA error {code}"


def _unregister(ptr: int, nbytes: int) -> None:
    # Looked up at call time, not bound at registration: tests inject a fake registrar into this module.
    code = cuda_host_unregister(ptr)
    if code != 0:
        warnings.warn(f"cudaHostUnregister of {nbytes} bytes at {ptr:#x} failed: {_error_name(code)}; "
                      f"the pages stay locked until the process exits", RuntimeWarning, stacklevel=2)


@dataclass(eq=False)
class PinnedBuffer:
    """One registered buffer.

    Attributes:
        tensor: what is handed out, ``shape``/``dtype``, starting at ``ptr`` (its storage starts there too, which
            is what ``is_pinned`` looks at); it and every view of it keep ``allocation`` alive.
        allocation: the owning pageable allocation (uint8, one page longer than ``locked_bytes``).
        ptr: start of the registered range, page aligned.
        locked_bytes: length of the registered range, whole pages.
    """

    tensor: torch.Tensor
    allocation: torch.Tensor
    ptr: int
    locked_bytes: int
    _finalizer: weakref.finalize = field(repr=False)

    @property
    def registered(self) -> bool:
        return self._finalizer.alive

    def unregister(self) -> None:
        """Unlock the pages now (idempotent). The tensor stays valid, as ordinary pageable memory."""
        self._finalizer()


def pin_exact(shape: Sequence[int], dtype: torch.dtype) -> PinnedBuffer:
    """A host tensor ``shape``/``dtype`` whose bytes, rounded up to whole pages, are page-locked with CUDA.

    Raises :class:`PinError` naming the bytes when the registration is refused (out of lockable memory)."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    locked = page_round(max(nbytes, 1))
    allocation = torch.empty(locked + PAGE_BYTES, dtype=torch.uint8)
    start = -allocation.data_ptr() % PAGE_BYTES
    # A storage of its own that starts at the aligned address (``is_pinned`` asks CUDA about the storage's start,
    # which for a plain slice would be the unregistered head); the memoryview keeps ``allocation`` alive.
    window = memoryview(allocation.numpy())[start:start + locked]
    pages = torch.frombuffer(window, dtype=torch.uint8)
    ptr = pages.data_ptr()
    code = cuda_host_register(ptr, locked)
    if code != 0:
        raise PinError(
            f"could not page-lock {locked} bytes ({locked / 2**30:.3f} GiB) of host memory for a {list(shape)} "
            f"{dtype} buffer: {_error_name(code)}. Free host memory or lower what the process locks (the offload "
            f"pool's limit_bytes, fewer offloaded checkpoints, more ulysses/ring ranks), and check the locked-memory "
            f"limits of the container/job (ulimit -l, cgroup memory limit)")
    # Tied to the window, which the storage holds until its last view dies: if the owner never unregisters, the
    # pages are unlocked just before they are freed, never after.
    finalizer = weakref.finalize(window, _unregister, ptr, locked)
    tensor = pages[:nbytes].view(dtype).view(tuple(shape))
    return PinnedBuffer(tensor=tensor, allocation=allocation, ptr=ptr, locked_bytes=locked, _finalizer=finalizer)


__all__ = ["PAGE_BYTES", "PinError", "PinnedBuffer", "can_register", "page_round", "pin_exact"]
