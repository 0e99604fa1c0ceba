"""Which code a profiled step's GPU time and GPU idle time belong to, from its trace
(``bench_train.py --profile_step N --profile_trace T.json.gz``).

    python bench/trace_report.py T.json.gz [--top 25] [--json out.json]

Every kernel and copy on the GPU is tied, through its launch's correlation id, to the host thread and moment
that launched it, and so to the Python frames open there (the trace holds them when it was taken with
stacks). The report sums, per launching site (the innermost frames of ``ds_longctx``, ``transformers``,
``deepspeed`` or the bench, not torch's own), each kernel class's seconds; and for every stretch in which
no compute kernel ran (the GPU idled), the site that launched the kernel that ended it, and what the host
threads were blocked in meanwhile (synchronizing calls of the CUDA runtime). Idle stretches shorter than
``--min-gap-us`` are launch overhead and are summed apart.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.step_profile import kernel_class  # noqa: E402

#: frames of these packages name a launching site; the rest (torch's own, the standard library) are skipped
SITE_MARKS = ("ds_longctx/", "transformers/", "deepspeed/", "bench/")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaStreamWaitEvent", "cudaHostAlloc", "cudaFreeHost", "cudaHostRegister", "cudaHostUnregister",
              "cudaMalloc", "cudaFree")


class Span(NamedTuple):
    """One trace event with a duration: ``start``/``end`` in microseconds."""
    name: str
    start: float
    end: float


class Launch(NamedTuple):
    """A GPU activity and where it came from: the host thread and time of its launch call."""
    name: str
    start: float
    end: float
    thread: int
    launched_at: float


def load(path: str) -> Dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def is_site(frame: str) -> bool:
    return any(mark in frame for mark in SITE_MARKS) and "bench/trace_report" not in frame


def short_frame(frame: str) -> str:
    """``.../site-packages/transformers/models/llama/modeling_llama.py(123): forward`` ->
    ``transformers/models/llama/modeling_llama.py(123): forward``."""
    for mark in SITE_MARKS:
        at = frame.find(mark)
        if at >= 0:
            return frame[at:]
    return frame


class ThreadStacks:
    """The Python frames (and torch ops) open on each host thread at given moments."""

    def __init__(self, frames_by_thread: Dict[int, List[Span]]):
        # properly nested per thread: by start, and the enclosing span before the enclosed one at a tie
        self.frames = {tid: sorted(spans, key=lambda s: (s.start, -s.end)) for tid, spans in frames_by_thread.items()}

    def sites(self, thread: int, moments: Sequence[float], frames: int = 2) -> List[str]:
        """For each of ``moments`` (any order): the innermost ``frames`` site frames open on ``thread`` then
        (innermost first), or the innermost torch op where no site frame is open. One sweep per thread."""
        spans = self.frames.get(thread, [])
        order = sorted(range(len(moments)), key=lambda i: moments[i])
        out = [""] * len(moments)
        stack: List[Span] = []
        next_span = 0
        for i in order:
            moment = moments[i]
            while next_span < len(spans) and spans[next_span].start <= moment:
                span = spans[next_span]
                while stack and stack[-1].end < span.start:
                    stack.pop()
                stack.append(span)
                next_span += 1
            while stack and stack[-1].end < moment:
                stack.pop()
            open_spans = [s for s in stack if s.end >= moment]
            found = [short_frame(s.name) for s in open_spans if is_site(s.name)]
            if found:
                out[i] = " <- ".join(reversed(found[-frames:]))
            else:
                out[i] = open_spans[-1].name if open_spans else "(no frame)"
        return out


def sites_of(stacks: ThreadStacks, launches: Sequence[Launch], frames: int = 2) -> List[str]:
    """The launching site of every activity of ``launches``."""
    out = [""] * len(launches)
    by_thread: Dict[int, List[int]] = defaultdict(list)
    for i, a in enumerate(launches):
        by_thread[a.thread].append(i)
    for thread, indices in by_thread.items():
        for i, site in zip(indices, stacks.sites(thread, [launches[i].launched_at for i in indices], frames)):
            out[i] = site
    return out


def parse(trace: Dict) -> Tuple[List[Launch], ThreadStacks, Dict[int, List[Span]]]:
    """The GPU activities with their launches, the host threads' frames and each thread's synchronizing calls."""
    launches_by_id: Dict[int, Tuple[int, float]] = {}
    frames: Dict[int, List[Span]] = defaultdict(list)
    syncs: Dict[int, List[Span]] = defaultdict(list)
    gpu = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        start = float(e["ts"])
        end = start + float(e.get("dur", 0.0))
        if cat in GPU_CATEGORIES:
            gpu.append((name, start, end, e.get("args", {}).get("correlation")))
        elif cat in ("cuda_runtime", "cuda_driver"):
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launches_by_id[corr] = (e["tid"], start)
            if any(name.startswith(s) for s in SYNC_CALLS) and "Async" not in name:
                syncs[e["tid"]].append(Span(name, start, end))
        elif cat in ("python_function", "cpu_op", "user_annotation"):
            frames[e["tid"]].append(Span(name, start, end))
    launches = []
    for name, start, end, corr in gpu:
        thread, at = launches_by_id.get(corr, (-1, start))
        launches.append(Launch(name, start, end, thread, at))
    launches.sort(key=lambda launch: launch.start)
    return launches, ThreadStacks(frames), syncs


def idle_stretches(launches: Sequence[Launch]) -> List[Tuple[float, float, int]]:
    """``(start, end, index of the compute activity that ended it)`` for every stretch with no compute on the
    GPU between the first and the last compute activity (host<->device copies do not count as compute)."""
    compute = [(i, a) for i, a in enumerate(launches) if kernel_class(a.name) not in ("copy_h2d", "copy_d2h")]
    gaps, busy_until = [], None
    for i, activity in compute:
        if busy_until is not None and activity.start > busy_until:
            gaps.append((busy_until, activity.start, i))
        busy_until = activity.end if busy_until is None else max(busy_until, activity.end)
    return gaps


def blocked_in(syncs: Dict[int, List[Span]], start: float, end: float) -> str:
    """The synchronizing runtime call that overlaps ``[start, end]`` the longest, on any host thread."""
    best, best_overlap = "", 0.0
    for spans in syncs.values():
        for span in spans:
            overlap = min(end, span.end) - max(start, span.start)
            if overlap > best_overlap:
                best, best_overlap = span.name, overlap
    return best


def report(trace: Dict, top: int = 25, min_gap_us: float = 50.0) -> Dict:
    """The attribution record: GPU seconds per (class, site), idle seconds per site that ended the idling."""
    launches, stacks, syncs = parse(trace)
    sites = sites_of(stacks, launches)
    deep_sites = sites_of(stacks, launches, frames=3)
    by_site: Dict[Tuple[str, str], List[float]] = defaultdict(lambda: [0.0, 0])
    for a, site in zip(launches, sites):
        entry = by_site[(kernel_class(a.name), site)]
        entry[0] += (a.end - a.start) / 1e6
        entry[1] += 1
    idle_by_site: Dict[Tuple[str, str], List[float]] = defaultdict(lambda: [0.0, 0])
    short_idle, short_count = 0.0, 0
    for start, end, ended_by in idle_stretches(launches):
        seconds = (end - start) / 1e6
        if end - start < min_gap_us:
            short_idle += seconds
            short_count += 1
            continue
        entry = idle_by_site[(deep_sites[ended_by], blocked_in(syncs, start, end))]
        entry[0] += seconds
        entry[1] += 1
    ranked = sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]
    idle_ranked = sorted(idle_by_site.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "gpu_seconds_by_site": [{"class": c, "site": s, "seconds": round(v[0], 6), "count": v[1]}
                                for (c, s), v in ranked],
        "idle_seconds": round(sum(v[0] for v in idle_by_site.values()) + short_idle, 6),
        "idle_short": {"seconds": round(short_idle, 6), "count": short_count, "under_us": min_gap_us},
        "idle_by_site": [{"ended_by": s, "host_blocked_in": b, "seconds": round(v[0], 6), "count": v[1]}
                         for (s, b), v in idle_ranked],
    }


def main(argv: Optional[Iterable[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--min-gap-us", type=float, default=50.0)
    ap.add_argument("--json", default=None, help="also write the record there")
    args = ap.parse_args(argv)
    record = report(load(args.trace), top=args.top, min_gap_us=args.min_gap_us)
    record["trace"] = os.path.basename(args.trace)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    print(f"GPU seconds by launching site (top {args.top}):")
    for row in record["gpu_seconds_by_site"]:
        print(f"  {row['seconds']:8.4f} s {row['count']:6d}x {row['class']:10s} {row['site']}")
    print(f"idle {record['idle_seconds']:.4f} s; stretches under {args.min_gap_us:.0f} us: "
          f"{record['idle_short']['seconds']:.4f} s in {record['idle_short']['count']}")
    for row in record["idle_by_site"]:
        print(f"  {row['seconds']:8.4f} s {row['count']:6d}x ended by {row['ended_by']}"
              f"{'  [host in ' + row['host_blocked_in'] + ']' if row['host_blocked_in'] else ''}")


if __name__ == "__main__":
    main()
