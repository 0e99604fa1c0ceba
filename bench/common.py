"""Shared pieces of the GPU benchmarks: environment record, timing, FLOP counts, JSON output.

The benchmarks measure on GPUs (NCCL). Without CUDA they run the same code on CPU ranks (gloo) at the
sizes they are given: that is how CI checks that a multi-rank bench runs through and writes its JSON
before any GPU time is spent on it. CPU numbers are no measurement: memory reads 0 there.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist


def causal_flops_fwd_bwd(batch: int, heads: int, seq: int, head_dim: int, causal: bool = True) -> float:
    """FLOPs of attention forward + backward: forward 4*B*H*S^2*D (half of it under a causal mask),
    backward 2.5x the forward (the convention of FlashAttention's and cuDNN's benchmarks)."""
    fwd = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return fwd * 3.5


# Llama-3-8B attention: 32 query heads, 8 kv heads, head_dim 128.
H, HKV, D = 32, 8, 128
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def make_inputs(seq_local: int, device, seed: int, dtype=torch.bfloat16):
    """Random q ``[1, S, H, D]``, k and v ``[1, S, HKV, D]`` and the output gradient ``[1, S, H, D]``."""
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda h: torch.randn(1, seq_local, h, D, device=device, dtype=dtype, generator=g)  # noqa: E731
    return mk(H), mk(HKV), mk(HKV), mk(H)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``|a - b| / |b|`` in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def init_distributed():
    """Process group for the launcher's ranks: NCCL with one GPU per rank, gloo on CPU.
    Returns (rank, world, device)."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return rank, dist.get_world_size(), torch.device("cuda" if cuda else "cpu")


class Memory:
    """The CUDA caching allocator's counters (bytes), or zeros and no-ops on CPU."""

    cuda = torch.cuda.is_available()
    sync = staticmethod(torch.cuda.synchronize if cuda else lambda: None)
    allocated = staticmethod(torch.cuda.memory_allocated if cuda else lambda: 0)
    peak = staticmethod(torch.cuda.max_memory_allocated if cuda else lambda: 0)
    reset_peak = staticmethod(torch.cuda.reset_peak_memory_stats if cuda else lambda: None)
    empty_cache = staticmethod(torch.cuda.empty_cache if cuda else lambda: None)
    # pinned host memory held by torch's caching host allocator (torch.empty(pin_memory=True), .pin_memory())
    _host_stats = getattr(torch.cuda, "host_memory_stats", None) if cuda else None
    host_pinned_peak = staticmethod((lambda: Memory._host_stats().get("allocated_bytes.peak", 0)) if _host_stats
                                    else lambda: 0)
    reset_host_pinned_peak = staticmethod(getattr(torch.cuda, "reset_peak_host_memory_stats", lambda: None)
                                          if _host_stats else lambda: None)

    @classmethod
    def total(cls, device) -> int:
        return torch.cuda.get_device_properties(device).total_memory if cls.cuda else 0


# What running out of device memory raises; nothing on CPU is caught as such.
OOM = torch.cuda.OutOfMemoryError


def out_of_memory_kind(exc: BaseException):
    """How ``exc`` ran out of memory: ``"gpu"`` (the CUDA caching allocator), ``"host"`` (Python's
    ``MemoryError``, ds_longctx's ``HostMemoryError``), ``"runtime"`` (another RuntimeError saying "out of
    memory": CUDA reports a failed pinned host allocation so); None when it is no out-of-memory (a bug: raise)."""
    if isinstance(exc, OOM):
        return "gpu"
    if isinstance(exc, MemoryError):
        return "host"
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc):
        return "runtime"
    return None


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["cudnn"] = str(torch.backends.cudnn.version())
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            pass
    for mod in ("deepspeed", "flash_attn", "ds_longctx"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001
            out[mod] = "absent"
    return out


def record_header(world: int, commit: str = "") -> Dict:
    launcher = (f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']} "
                if "LOCAL_WORLD_SIZE" in os.environ else "python ")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": launcher + " ".join(sys.argv),
        "commit": commit,
        "world_size": world,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "versions": versions(),
        "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")
                if k in os.environ},
    }


def _mark():
    """A point in time: a recorded CUDA event (device time), or the wall clock on CPU."""
    if not Memory.cuda:
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _elapsed_ms(a, b) -> float:
    return a.elapsed_time(b) if Memory.cuda else (b - a) * 1e3


def time_interleaved(fns: Dict[str, Callable[[], torch.Tensor]], grad: torch.Tensor, leaves: List[torch.Tensor],
                     iters: int, warmup: int, group=None) -> Dict[str, Dict]:
    """Forward + backward of several implementations on the same inputs, timed in rounds: each round runs
    every implementation once, in the given order, so a drift of clocks or temperature during the run falls
    on all of them alike instead of on whichever was measured last. ``leaves`` get their gradients cleared
    before each run (none accumulates into the next).

    Returns, per name: the median forward and backward milliseconds over the timed rounds (CUDA events;
    wall clock on CPU), as the slowest rank saw them, the per-round times, their spread ((max - min) /
    median, this rank) and the peak of allocated device memory (bytes, 0 on CPU); or ``{"oom": True}``
    for an implementation that ran out of device memory (it is left out of the later rounds). All ranks
    start each run together."""
    times: Dict[str, List] = {name: [] for name in fns}
    peak: Dict[str, int] = {name: 0 for name in fns}
    oom = set()
    for i in range(warmup + iters):
        for name, fwd in fns.items():
            if name in oom:
                continue
            for leaf in leaves:
                leaf.grad = None
            if dist.is_initialized():
                dist.barrier(group=group)
            Memory.sync()
            Memory.reset_peak()
            try:
                t0 = _mark()
                out = fwd()
                t1 = _mark()
                out.backward(grad)
                t2 = _mark()
                Memory.sync()
                f_ms, b_ms = _elapsed_ms(t0, t1), _elapsed_ms(t1, t2)
                del out
            except OOM:
                out = None  # noqa: F841 - the half-built graph goes before the next implementation runs
                oom.add(name)
                Memory.empty_cache()
                continue
            peak[name] = max(peak[name], Memory.peak())
            if i >= warmup:
                times[name].append((f_ms, b_ms))
    for leaf in leaves:
        leaf.grad = None
    names = list(fns)
    med = torch.tensor([[statistics.median(t[0] for t in times[n]), statistics.median(t[1] for t in times[n])]
                        if n not in oom else [0.0, 0.0] for n in names],
                       device="cuda" if Memory.cuda else "cpu", dtype=torch.float64)
    # Every rank reports the slowest rank's time: that is the step time of the group.
    if dist.is_initialized():
        dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
    out: Dict[str, Dict] = {}
    for j, n in enumerate(names):
        if n in oom:
            out[n] = {"oom": True}
            continue
        total = [f + b for f, b in times[n]]
        out[n] = {"fwd_ms": med[j, 0].item(), "bwd_ms": med[j, 1].item(), "fwd_bwd_ms": med[j].sum().item(),
                  "fwd_ms_all": [f for f, _ in times[n]], "bwd_ms_all": [b for _, b in times[n]],
                  "spread": (max(total) - min(total)) / statistics.median(total), "peak_bytes": peak[n]}
    return out


def time_fwd_bwd(fwd: Callable[[], torch.Tensor], grad: torch.Tensor, iters: int, warmup: int,
                 leaves: List[torch.Tensor] = (), group=None) -> Dict[str, float]:
    """``time_interleaved`` of one implementation; running out of device memory raises."""
    t = time_interleaved({"fwd": fwd}, grad, list(leaves), iters, warmup, group)["fwd"]
    if t.get("oom"):
        raise OOM("out of device memory while timing")
    return t


def write_json(path: str, payload: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
