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
    """The CUDA caching allocator's counters, or zeros on CPU."""

    cuda = torch.cuda.is_available()

    @classmethod
    def sync(cls) -> None:
        if cls.cuda:
            torch.cuda.synchronize()

    @classmethod
    def allocated(cls) -> int:
        return torch.cuda.memory_allocated() if cls.cuda else 0

    @classmethod
    def peak(cls) -> int:
        return torch.cuda.max_memory_allocated() if cls.cuda else 0

    @classmethod
    def reset_peak(cls) -> None:
        if cls.cuda:
            torch.cuda.reset_peak_memory_stats()

    @classmethod
    def empty_cache(cls) -> None:
        if cls.cuda:
            torch.cuda.empty_cache()

    @classmethod
    def total(cls, device) -> int:
        return torch.cuda.get_device_properties(device).total_memory if cls.cuda else 0


# What running out of device memory raises; nothing on CPU is caught as such.
OOM = torch.cuda.OutOfMemoryError


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
    cuda = torch.cuda.is_available()
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
                if cuda:
                    e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                    e0.record()
                    out = fwd()
                    e1.record()
                    out.backward(grad)
                    e2.record()
                    torch.cuda.synchronize()
                    f_ms, b_ms = e0.elapsed_time(e1), e1.elapsed_time(e2)
                else:
                    t0 = time.perf_counter()
                    out = fwd()
                    t1 = time.perf_counter()
                    out.backward(grad)
                    t2 = time.perf_counter()
                    f_ms, b_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
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
                       device="cuda" if cuda else "cpu", dtype=torch.float64)
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
