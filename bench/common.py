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
        "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }


def time_fwd_bwd(fwd: Callable[[], torch.Tensor], grad: torch.Tensor, iters: int, warmup: int,
                 group=None) -> Dict[str, float]:
    """Median forward and backward milliseconds (CUDA events; wall clock on CPU), all ranks started
    together each iteration."""
    fwd_ms: List[float] = []
    bwd_ms: List[float] = []
    cuda = torch.cuda.is_available()
    for i in range(warmup + iters):
        if dist.is_initialized():
            dist.barrier(group=group)
        if cuda:
            torch.cuda.synchronize()
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
        if i >= warmup:
            fwd_ms.append(f_ms)
            bwd_ms.append(b_ms)
        del out
    f, b = statistics.median(fwd_ms), statistics.median(bwd_ms)
    # Every rank reports the slowest rank's time: that is the step time of the group.
    t = torch.tensor([f, b], device="cuda" if cuda else "cpu", dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return {"fwd_ms": t[0].item(), "bwd_ms": t[1].item(), "fwd_bwd_ms": t.sum().item(),
            "fwd_ms_all": fwd_ms, "bwd_ms_all": bwd_ms}


def write_json(path: str, payload: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
