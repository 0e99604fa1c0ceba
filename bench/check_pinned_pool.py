"""The offload pool's page-locked buffers on a GPU: exact sizes, pinned, asynchronous, bit-exact, as fast as torch's.

    python bench/check_pinned_pool.py --out $OUT/check_pinned_pool_h200x1.json

The pool (:class:`ds_longctx.memory.HostPool`) page-locks its buffers with ``cudaHostRegister`` instead of taking
them from torch's pinned host allocator, which rounds each request up to a power of two. For buffers of the
sizes a Llama-3.2-3B at 262K tokens offloads (1.5 GiB checkpoints, 384 MiB FPDT chunks) and small odd ones,
this checks that

* each buffer locks its bytes rounded up to a page, ``is_pinned()`` is true, and the pool counts the locked bytes;
* torch's host allocator does not see them (``torch.cuda.host_memory_stats`` unchanged);
* a device->host and a host->device copy on side streams round-trip bit-exactly, and issuing the 1.5 GiB
  ``non_blocking`` copy returns long before the copy is done (asynchronous, as for ``pin_memory=True``);
* H2D and D2H bandwidth of a registered buffer match a ``torch.empty(pin_memory=True)`` one (within 15%);
* after ``release()`` nothing is registered any more (``is_pinned()`` false on a kept reference).

``/proc/self/status`` (VmLck, VmPin, VmRSS) is recorded before, with the buffers, and after the release, as read
(the driver's pinning need not show in VmLck). Exits 1 when a check fails. Meant to take well under 30 s on one GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import record_header, write_json  # noqa: E402
from ds_longctx.memory import HostPool  # noqa: E402
from ds_longctx.memory.pinned import page_round  # noqa: E402

GiB, MiB = 2 ** 30, 2 ** 20
HIDDEN = 3072  # Llama-3.2-3B: a [tokens, hidden] bf16 row is 6 KiB
# (name, shape, dtype): a checkpointed layer input at 262K tokens, an FPDT chunk buffer, a small one, an odd one
BUFFERS = [("checkpoint_1.5GiB", (262144, HIDDEN), torch.bfloat16),
           ("fpdt_chunks_384MiB", (65536, HIDDEN), torch.bfloat16),
           ("small_3MiB", (512, HIDDEN), torch.bfloat16),
           ("odd_12000B", (1000, 3), torch.float32)]


def proc_status() -> dict:
    """VmLck, VmPin and VmRSS of this process, in bytes (absent keys: the kernel does not report them)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmLck", "VmPin", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def host_stats() -> dict:
    stats = torch.cuda.host_memory_stats()
    return {k: stats.get(k, 0) for k in ("allocated_bytes.current", "active_bytes.current", "allocations.current")}


def random_like(shape, dtype, device) -> torch.Tensor:
    """Random bits in ``shape``/``dtype`` (every byte pattern, NaNs included: compared as bytes)."""
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), dtype=torch.uint8, device=device).view(dtype).view(shape)


def round_trip(host: torch.Tensor, device: torch.device, d2h: torch.cuda.Stream, h2d: torch.cuda.Stream) -> dict:
    """Device -> ``host`` on ``d2h``, back on ``h2d``; bit-exact, and how long issuing took against copying."""
    src = random_like(host.shape, host.dtype, device)
    d2h.wait_stream(torch.cuda.current_stream(device))
    start, copied = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(d2h):
        start.record(d2h)
        t0 = time.perf_counter()
        host.copy_(src, non_blocking=True)
        issue_s = time.perf_counter() - t0
        copied.record(d2h)
    back = torch.empty_like(src)
    with torch.cuda.stream(h2d):
        h2d.wait_event(copied)
        back.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(h2d)
    done.synchronize()
    exact = torch.equal(back.view(torch.uint8), src.view(torch.uint8))
    return {"bit_exact": bool(exact), "d2h_issue_ms": issue_s * 1e3, "d2h_copy_ms": start.elapsed_time(copied)}


def bandwidth(host: torch.Tensor, device: torch.device, stream: torch.cuda.Stream, repeats: int) -> dict:
    """Best H2D and D2H GB/s over ``repeats`` copies of the whole ``host`` buffer on ``stream``."""
    dev = torch.empty(host.shape, dtype=host.dtype, device=device)
    nbytes = host.numel() * host.element_size()
    stream.wait_stream(torch.cuda.current_stream(device))
    out = {}
    for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        best = float("inf")
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                a.record(stream)
                dst.copy_(src, non_blocking=True)
                b.record(stream)
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        out[f"{name}_gb_per_s"] = nbytes / best / 1e9
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=5, help="copies per bandwidth measurement (the best counts)")
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    payload = record_header(1, args.commit)
    if not torch.cuda.is_available():
        payload["error"] = "needs a CUDA device: the pool page-locks its buffers only with CUDA"
        write_json(args.out, payload)
        print(payload["error"], file=sys.stderr)
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.init()
    d2h, h2d = torch.cuda.Stream(device), torch.cuda.Stream(device)
    checks = {}
    # .item() and torch.equal read a scalar through a small block of torch's pinned allocator: take it now, so the
    # allocator's bytes below change only if the pool's buffers went through it
    torch.equal(torch.zeros(1, device=device), torch.zeros(1, device=device))
    status = {"before": proc_status()}
    stats = {"before": host_stats()}

    pool = HostPool()
    lease = pool.lease()
    buffers, rows = {}, []
    for name, shape, dtype in BUFFERS:
        locked_before, t0 = pool.locked_bytes, time.perf_counter()
        buf = lease.acquire(shape, dtype, pin=True)
        register_s = time.perf_counter() - t0
        nbytes = buf.numel() * buf.element_size()
        locked = pool.locked_bytes - locked_before
        row = {"name": name, "shape": list(shape), "dtype": str(dtype), "bytes": nbytes, "locked_bytes": locked,
               "power_of_two_bytes": 1 << (nbytes - 1).bit_length(), "register_s": register_s,
               "is_pinned": bool(buf.is_pinned())}
        checks[f"{name}_locks_its_pages"] = locked == page_round(nbytes)
        checks[f"{name}_is_pinned"] = row["is_pinned"]
        row.update(round_trip(buf, device, d2h, h2d))
        checks[f"{name}_round_trip_bit_exact"] = row["bit_exact"]
        rows.append(row)
        buffers[name] = buf
    big = rows[0]
    checks["non_blocking_copy_is_asynchronous"] = big["d2h_issue_ms"] < 0.5 * big["d2h_copy_ms"]
    checks["pool_counts_the_locked_bytes"] = pool.held_bytes == pool.locked_bytes == sum(r["locked_bytes"]
                                                                                          for r in rows)
    status["with_pool"] = proc_status()
    stats["with_pool"] = host_stats()
    grew = stats["with_pool"]["allocated_bytes.current"] - stats["before"]["allocated_bytes.current"]
    stats["allocator_growth_with_pool_bytes"] = grew
    checks["pool_buffers_not_in_torch_host_allocator"] = grew < min(r["locked_bytes"] for r in rows)

    registered = buffers[BUFFERS[0][0]]
    reference = torch.empty(registered.shape, dtype=registered.dtype, pin_memory=True)
    stats["with_reference"] = host_stats()
    speed = {"bytes": registered.numel() * registered.element_size(),
             "registered": bandwidth(registered, device, d2h, args.repeats),
             "torch_pin_memory": bandwidth(reference, device, d2h, args.repeats),
             "torch_allocator_bytes_for_reference": stats["with_reference"]["allocated_bytes.current"]
             - stats["with_pool"]["allocated_bytes.current"]}
    for direction in ("h2d", "d2h"):
        ratio = speed["registered"][f"{direction}_gb_per_s"] / speed["torch_pin_memory"][f"{direction}_gb_per_s"]
        speed[f"{direction}_ratio"] = ratio
        checks[f"{direction}_bandwidth_matches_pin_memory"] = ratio >= 0.85
    del reference

    kept = registered[:1]  # a reference that outlives the release: its pages must be unlocked all the same
    del registered
    buffers.clear()
    lease.release()
    pool.release()
    checks["release_unregisters_everything"] = pool.held_bytes == 0 and pool.locked_bytes == 0 and not kept.is_pinned()
    del kept
    status["after_release"] = proc_status()

    payload.update(buffers=rows, bandwidth=speed, host_memory_stats=stats, proc_status=status, checks=checks,
                   ok=all(checks.values()))
    write_json(args.out, payload)
    for name, ok in checks.items():
        print(("ok    " if ok else "FAIL  ") + name)
    print(f"H2D {speed['registered']['h2d_gb_per_s']:.1f} GB/s registered vs "
          f"{speed['torch_pin_memory']['h2d_gb_per_s']:.1f} pin_memory; D2H "
          f"{speed['registered']['d2h_gb_per_s']:.1f} vs {speed['torch_pin_memory']['d2h_gb_per_s']:.1f}")
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
