"""Shared pieces of the GPU benchmarks: environment record, timing, FLOP counts, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from typing import Callable, Dict, List

import torch
import torch.distributed as dist


def causal_flops_fwd_bwd(batch: int, heads: int, seq: int, head_dim: int, causal: bool = True) -> float:
    """FLOPs of attention forward + backward: forward 4*B*H*S^2*D (half of it under a causal mask),
    backward 2.5x the forward (the convention of FlashAttention's and cuDNN's benchmarks)."""
    fwd = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return fwd * 3.5


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
    """Median forward and backward milliseconds (CUDA events), all ranks started together each iteration."""
    fwd_ms: List[float] = []
    bwd_ms: List[float] = []
    for i in range(warmup + iters):
        if dist.is_initialized():
            dist.barrier(group=group)
        torch.cuda.synchronize()
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        out = fwd()
        e1.record()
        out.backward(grad)
        e2.record()
        torch.cuda.synchronize()
        if i >= warmup:
            fwd_ms.append(e0.elapsed_time(e1))
            bwd_ms.append(e1.elapsed_time(e2))
        del out
    f, b = statistics.median(fwd_ms), statistics.median(bwd_ms)
    # Every rank reports the slowest rank's time: that is the step time of the group.
    t = torch.tensor([f, b], device="cuda")
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return {"fwd_ms": t[0].item(), "bwd_ms": t[1].item(), "fwd_bwd_ms": t.sum().item(),
            "fwd_ms_all": fwd_ms, "bwd_ms_all": bwd_ms}


def write_json(path: str, payload: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
