"""Where one training step's time goes on the GPU: ``bench_train.py --profile_step``.

The step (forward, backward and the optimizer's step) runs under ``torch.profiler`` (CUDA activity); its record
says, in seconds: the step's wall time, the time the GPU ran at least one compute kernel (the union of their
intervals, so overlapping streams count once) and the rest (``gpu_idle_s``: launch gaps, host work, waits for copies), each kernel class's summed
time (attention, matmul, copies host<->device and device<->device, the rest: elementwise, reductions,
norms), the busy time of the copies that overlapped no compute kernel (``exposed_copy_s``), and the 25
kernels with the largest summed time. Attention's share against the planner's rate tells whether the kernel
or its surroundings are slow.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

import torch

ATTENTION_MARKS = ("fmha", "flash", "sdpa", "fprop", "bprop", "attn", "cudnn")
MATMUL_MARKS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul")


def kernel_class(name: str) -> str:
    """attention / matmul / copy_h2d / copy_d2h / copy_d2d / other, from a CUDA activity's name."""
    low = name.lower()
    if low.startswith("memcpy"):
        return {"htod": "copy_h2d", "dtoh": "copy_d2h"}.get(low.split()[1].lower() if " " in low else "", "copy_d2d")
    if low.startswith("memset"):
        return "other"
    if any(m in low for m in ATTENTION_MARKS):
        return "attention"
    if any(m in low for m in MATMUL_MARKS):
        return "matmul"
    return "other"


def union_seconds(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of ``(start_us, end_us)`` intervals, in seconds."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total / 1e6


def exposed_seconds(copies: List[Tuple[float, float]], compute: List[Tuple[float, float]]) -> float:
    """Seconds in which a copy ran and no compute kernel did."""
    return union_seconds(copies + compute) - union_seconds(compute)


def summarize(device_events: List[Tuple[str, float, float]], wall_s: float, top: int = 25) -> Dict:
    """The profile record from ``(name, start_us, end_us)`` GPU activities of one step of ``wall_s`` seconds."""
    by_class: Dict[str, float] = {}
    by_name: Dict[str, List[float]] = {}
    compute, copies = [], []
    for name, lo, hi in device_events:
        cls = kernel_class(name)
        by_class[cls] = by_class.get(cls, 0.0) + (hi - lo) / 1e6
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += (hi - lo) / 1e6
        entry[1] += 1
        (copies if cls in ("copy_h2d", "copy_d2h") else compute).append((lo, hi))
    busy = union_seconds(compute)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"wall_s": wall_s, "gpu_busy_s": busy, "gpu_idle_s": max(0.0, wall_s - busy),
            "class_s": {k: round(v, 4) for k, v in sorted(by_class.items())},
            "exposed_copy_s": exposed_seconds(copies, compute),
            "top_kernels": [{"name": n[:160], "seconds": round(s, 4), "calls": c} for n, (s, c) in ranked]}


def write_trace(prof, path: str) -> None:
    """The profiler's Chrome trace, gzipped, at ``path`` (a ``.json.gz`` is what chrome://tracing and Perfetto
    open)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


class StepProfiler:
    """Profiles one step: ``context(step)`` around every step (a profiler only around ``self.step``), then
    ``finish(step, wall_s)`` returns that step's :func:`summarize` record (None for the others)."""

    def __init__(self, step: int, trace_path: Optional[str] = None):
        self.step = step
        self.trace_path = trace_path
        self.prof = None
        self.result = None

    def context(self, step: int):
        if step != self.step or not torch.cuda.is_available():
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile
        # stacks only when a trace is kept: they slow the host side, so the summary alone runs without them
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                            with_stack=self.trace_path is not None)
        return self.prof

    def finish(self, step: int, wall_s: float):
        if step != self.step or self.prof is None:
            return None
        events = [(e.name, e.time_range.start, e.time_range.end) for e in self.prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA]
        self.result = summarize(events, wall_s)
        if self.trace_path is not None:
            write_trace(self.prof, self.trace_path)
            self.result["trace"] = os.path.basename(self.trace_path)
        self.prof = None
        return self.result
