"""The offload pool page-locks exactly the pages it needs (no power-of-two rounding) and unlocks each buffer once.

CUDA's registrar is replaced by a fake that keeps the registered ranges, so these run on CPU; the same calls on
an H200 are checked by bench/check_pinned_pool.py."""
import gc

import pytest
import torch

from ds_longctx.memory import HostMemoryError, HostPool, host_pool, pinned

PAGE = pinned.PAGE_BYTES
NOT_REGISTERED = 713  # cudaErrorHostMemoryNotRegistered


class FakeRegistrar:
    """Stands in for cudaHostRegister/cudaHostUnregister; ``log`` keeps the order of what happened."""

    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.live = {}          # ptr -> registered bytes
        self.registered = []    # (ptr, nbytes) per successful call
        self.unregistered = []  # ptr per call
        self.log = []

    def register(self, ptr: int, nbytes: int) -> int:
        if self.refuse:
            return 2  # cudaErrorMemoryAllocation
        assert ptr % PAGE == 0 and nbytes % PAGE == 0, (ptr, nbytes)
        for other, n in self.live.items():  # CUDA refuses a range overlapping a registered one
            assert ptr + nbytes <= other or other + n <= ptr, "two registered buffers share a page"
        self.live[ptr] = nbytes
        self.registered.append((ptr, nbytes))
        self.log.append(("register", ptr))
        return 0

    def unregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        self.log.append(("unregister", ptr))
        return 0 if self.live.pop(ptr, None) is not None else NOT_REGISTERED


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeRegistrar()
    monkeypatch.setattr(pinned, "can_register", lambda: True)
    monkeypatch.setattr(pinned, "cuda_host_register", fake.register)
    monkeypatch.setattr(pinned, "cuda_host_unregister", fake.unregister)
    return fake


def _record(pool: HostPool, buf: torch.Tensor) -> pinned.PinnedBuffer:
    return pool._locked[buf.data_ptr()]


def test_page_round_is_whole_pages_not_powers_of_two():
    assert pinned.page_round(1) == PAGE and pinned.page_round(PAGE) == PAGE
    assert pinned.page_round(5 * PAGE + 8) == 6 * PAGE  # a power of two would be 8 pages
    assert pinned.page_round(3 * 2 ** 29) == 3 * 2 ** 29  # 1.5 GiB stays 1.5 GiB, not 2


def test_a_pinned_buffer_locks_its_bytes_rounded_to_pages_and_the_pool_counts_those(cuda):
    pool = HostPool()
    lease = pool.lease()
    buf = lease.acquire(((5 * PAGE + 8) // 4,), torch.float32, pin=True)
    assert buf.shape == ((5 * PAGE + 8) // 4,) and buf.dtype == torch.float32
    assert cuda.registered == [(buf.data_ptr(), 6 * PAGE)]
    # the storage starts at the registered address: that is what tensor.is_pinned() asks CUDA about
    assert buf.untyped_storage().data_ptr() == buf.data_ptr()
    assert pool.held_bytes == pool.leased_bytes == pool.locked_bytes == 6 * PAGE
    lease.release()
    assert pool.idle_bytes == 6 * PAGE and cuda.unregistered == []  # kept locked for the next step
    again = pool.lease().acquire(buf.shape, torch.float32, pin=True)
    assert again.data_ptr() == buf.data_ptr() and len(cuda.registered) == 1 and pool.allocations == 1


def test_no_two_pinned_buffers_share_a_page_and_each_lies_inside_its_own_allocation(cuda):
    pool = HostPool()
    lease = pool.lease()
    sizes = [1, PAGE - 1, PAGE, PAGE + 1, 3 * 2 ** 20 + 12345]
    bufs = [lease.acquire((n,), torch.uint8, pin=True) for n in sizes]  # the fake asserts disjoint pages
    for i, (buf, n) in enumerate(zip(bufs, sizes)):
        rec = _record(pool, buf)
        assert rec.ptr == buf.data_ptr() and rec.locked_bytes == pinned.page_round(n)
        owner = rec.allocation
        assert owner.data_ptr() <= rec.ptr and rec.ptr + rec.locked_bytes <= owner.data_ptr() + owner.numel()
        buf.fill_(i + 1)
    assert [int(b.sum()) for b in bufs] == [(i + 1) * n for i, n in enumerate(sizes)]  # nothing overlaps
    assert pool.held_bytes == sum(pinned.page_round(n) for n in sizes)


def test_release_unregisters_each_idle_buffer_exactly_once(cuda):
    pool = HostPool()
    lease = pool.lease()
    ptrs = {lease.acquire((n,), torch.uint8, pin=True).data_ptr() for n in (100, 3 * PAGE)}
    lease.release()
    pool.release()
    assert sorted(cuda.unregistered) == sorted(ptrs) and cuda.live == {}
    assert pool.held_bytes == 0 and pool.locked_bytes == 0
    pool.release()
    del lease
    gc.collect()  # the buffers' storages die now: their fallback must not unregister a second time
    assert sorted(cuda.unregistered) == sorted(ptrs)


def test_a_buffer_leased_during_release_is_unregistered_once_when_handed_back_after_its_copy(cuda):
    class Event:
        def synchronize(self):
            cuda.log.append(("copy done", None))

    pool = HostPool()
    lease = pool.lease()
    ptr = lease.acquire((PAGE + 3,), torch.uint8, pin=True).data_ptr()
    lease.after(Event(), stream="d2h")
    pool.release()
    assert cuda.unregistered == []  # still leased: a copy may be using it
    lease.release()
    assert cuda.log == [("register", ptr), ("copy done", None), ("unregister", ptr)]
    lease.release()
    assert cuda.unregistered == [ptr] and pool.held_bytes == pool.leased_bytes == 0


def test_the_limit_counts_locked_bytes_and_a_refusal_leaves_nothing_registered(cuda):
    nbytes = 5 * PAGE + 8
    pool = HostPool(limit_bytes=6 * PAGE - 1)  # the tensor's bytes fit, its pages do not
    with pytest.raises(HostMemoryError, match=f"needs {6 * PAGE} more bytes"):
        pool.lease().acquire((nbytes,), torch.uint8, pin=True)
    assert cuda.registered == [] and pool.held_bytes == 0
    fits = HostPool(limit_bytes=6 * PAGE)
    fits.lease().acquire((nbytes,), torch.uint8, pin=True)
    assert fits.held_bytes == 6 * PAGE


def test_a_registration_cuda_refuses_names_the_bytes_and_leaves_nothing_held(cuda):
    cuda.refuse = True
    pool = HostPool()
    with pytest.raises(HostMemoryError, match=r"could not page-lock 8192 bytes .*ulimit -l"):
        pool.lease().acquire((PAGE + 1,), torch.uint8, pin=True)
    assert pool.held_bytes == pool.leased_bytes == pool.allocations == 0 and pool._locked == {}


def test_leaving_the_pool_or_the_process_unregisters_every_buffer_once(cuda, monkeypatch):
    with HostPool() as pool:
        lease = pool.lease()
        lease.acquire((10,), torch.uint8, pin=True)
        lease.release()
        kept = pool.lease()
        kept.acquire((20,), torch.uint8, pin=True)
    assert len(cuda.unregistered) == 1  # the idle one; the leased one goes when its lease ends
    kept.release()
    assert len(cuda.unregistered) == 2 and cuda.live == {}

    default = HostPool()
    monkeypatch.setattr(host_pool, "_DEFAULT", default)
    lease = default.lease()
    lease.acquire((30,), torch.uint8, pin=True)
    lease.release()
    host_pool._release_default()  # what interpreter exit runs
    assert len(cuda.unregistered) == 3 and cuda.live == {}


def test_a_buffer_its_owner_forgot_is_unregistered_once_when_its_last_view_dies(cuda):
    record = pinned.pin_exact((3, PAGE), torch.float16)
    view = record.tensor[1]  # the handed-out tensor's views keep the allocation alive
    ptr = record.ptr
    del record
    gc.collect()
    view.fill_(2.0)
    assert cuda.unregistered == [] and float(view.sum()) == 2.0 * PAGE
    del view
    gc.collect()
    assert cuda.unregistered == [ptr] and cuda.live == {}


def test_unpinned_buffers_and_machines_without_cuda_register_nothing(cuda, monkeypatch):
    pool = HostPool()
    buf = pool.lease().acquire((PAGE + 1,), torch.uint8, pin=False)
    assert pool.held_bytes == PAGE + 1 and not buf.is_pinned()  # exact bytes, ordinary memory, as before
    monkeypatch.setattr(pinned, "can_register", lambda: False)
    if torch.cuda.is_available():
        assert pool.lease().acquire((7,), torch.uint8, pin=True).is_pinned()
    else:
        with pytest.raises(HostMemoryError):  # pinning needs CUDA, as before
            pool.lease().acquire((7,), torch.uint8, pin=True)
    assert cuda.registered == [] and pool.locked_bytes == 0



class PendingCopy:
    """Stands in for the CUDA event of a copy still running: ``synchronize`` is when the host would wait."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def synchronize(self):
        self.log.append(("wait", self.name))


def test_a_lease_ends_without_waiting_for_its_copies_and_the_buffer_waits_for_them_before_reuse_or_free():
    pool, log = HostPool(), []
    lease = pool.lease()
    buf = lease.acquire((4, 8), torch.float32, pin=False)
    lease.after(PendingCopy(log, "d2h"), stream="d2h")
    lease.after(PendingCopy(log, "h2d"), stream="h2d")
    lease.release()
    assert log == [] and pool.leased_bytes == 0  # back in the pool, the host never stalled at the end of a layer
    again = pool.lease().acquire((4, 8), torch.float32, pin=False)
    assert again.data_ptr() == buf.data_ptr() and sorted(log) == [("wait", "d2h"), ("wait", "h2d")]
    log.clear()
    second = pool.lease()
    second.acquire((2, 2), torch.float32, pin=False)
    second.after(PendingCopy(log, "late"), stream="d2h")
    second.release()
    pool.release()  # freeing an idle buffer waits for its copy first
    assert log == [("wait", "late")]
