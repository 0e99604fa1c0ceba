"""FPDT chunking and host offload on GPUs: exactness, peak memory against S, throughput against chunk size,
and the copy/compute overlap read from a CUDA trace, all in one run.

    torchrun --nproc_per_node N bench/bench_fpdt.py --out $OUT/fpdt.json

Llama-3-8B attention shapes (32 query heads, 8 kv heads, head_dim 128), causal, bf16, batch 1, one
attention layer forward + backward. The topology is pure Ulysses over all ranks unless --ulysses/--ring
say otherwise. Modes:

* ``unchunked``  : ``attention(q, k, v, topo)``
* ``chunk:C``    : ``attention(..., chunk_size=C)`` (K/V and saved chunks stay on the GPU)
* ``offload:C``  : ``attention(..., chunk_size=C, offload=True)`` (pinned host memory, side streams)
* ``deepspeed``  : DeepSpeed's Ulysses ``DistributedAttention`` with cuDNN SDPA, the same harness

Memory is what the CUDA caching allocator reports: ``peak_gib`` is the whole peak of the layer (inputs q, k,
v, dout, and the out/dq/dk/dv the layer must return included), ``working_gib`` is the peak minus the
inputs, ``state_gib`` additionally minus out/dq/dk/dv: the attention's own state, which FPDT bounds.

Without CUDA it runs on CPU ranks (gloo) as a smoke test of the script (small sizes, --dtype float32,
--trace-seq 0): memory reads 0 there and the "host" copies are plain copies.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import (DTYPES, HKV, OOM, D, H, Memory, causal_flops_fwd_bwd,  # noqa: E402
                          init_distributed, make_inputs, record_header, rel,
                          time_fwd_bwd, write_json)
from ds_longctx.attention import attention  # noqa: E402
from ds_longctx.kernels import get_kernel  # noqa: E402
from ds_longctx.layout import shard, unshard  # noqa: E402
from ds_longctx.memory import default_pool  # noqa: E402
from ds_longctx.topology import Topology  # noqa: E402

GiB = 2 ** 30



def parse_mode(mode):
    kind, _, c = mode.partition(":")
    if kind == "unchunked" or kind == "deepspeed":
        return kind, None, False
    if kind in ("chunk", "offload"):
        return kind, int(c), kind == "offload"
    raise SystemExit(f"unknown mode {mode!r}: use unchunked, deepspeed, chunk:C or offload:C")



def runner(mode, topo, kernel, ds_attn):
    kind, C, off = parse_mode(mode)
    # Fresh copies stand for a model's projection outputs: nothing but the attention holds them, so what
    # its autograd graph keeps between forward and backward shows as retained memory.
    if kind == "deepspeed":
        return lambda q, k, v: ds_attn(q.clone(), k.clone(), v.clone(), batch_dim_idx=0)
    opts = {} if C is None else {"chunk_size": C, "offload": off}
    return lambda q, k, v: attention(q.clone(), k.clone(), v.clone(), topo, causal=True, kernel=kernel, **opts)


def one_step(fn, q, k, v, do):
    out = fn(q, k, v)
    out.backward(do)
    return out


def exactness(topo, kernel, device, seq, chunks, dtype=torch.bfloat16):
    """Chunked (with and without offload) against unchunked, both distributed, same inputs, in ``dtype``."""
    q, k, v, do = make_inputs(seq, device, seed=7, dtype=dtype)
    res = {}
    ref = None
    for mode in ["unchunked"] + [f"{m}:{c}" for c in chunks for m in ("chunk", "offload")]:
        _, C, _ = parse_mode(mode)
        loc = [shard(t, topo, chunk_size=C).detach().requires_grad_() for t in (q, k, v)]
        out = runner(mode, topo, kernel, None)(*loc)
        out.backward(shard(do, topo, chunk_size=C))
        got = [unshard(out.detach(), topo, chunk_size=C)] + [unshard(t.grad, topo, chunk_size=C) for t in loc]
        if ref is None:
            ref = got
        else:
            res[mode] = {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
    return res


def measure(mode, seq, topo, kernel, ds_attn, device, iters, steps=1, dtype=torch.bfloat16):
    """Peak memory of ``steps`` fwd+bwd (the first is cold), the memory the layer's graph retains between
    forward and backward, then the median time of ``iters`` more."""
    world = dist.get_world_size()
    n = seq // world
    pool = default_pool()
    row = {"mode": mode, "total_tokens": seq, "tokens_per_gpu": n}
    q, k, v, do = make_inputs(n, device, seed=seq, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    fn = runner(mode, topo, kernel, ds_attn)
    Memory.sync()
    Memory.empty_cache()
    base = Memory.allocated()
    # what the layer must hand back whatever it does inside: out, dq, dk, dv
    returned = sum(t.numel() * t.element_size() for t in (q, q, k, v))
    try:
        peaks = []
        alloc_before = pool.allocations
        retained = []
        for step in range(steps):
            Memory.reset_peak()
            out = fn(*leaves)
            Memory.sync()
            retained.append(Memory.allocated() - base - out.numel() * out.element_size())
            out.backward(do)
            del out
            Memory.sync()
            peaks.append(Memory.peak() - base)
            for t in leaves:
                t.grad = None
            if step == 0:
                alloc_warm = pool.allocations
        row["retained_after_forward_gib"] = max(retained) / GiB
        row["host_allocations_first_step"] = alloc_warm - alloc_before
        if steps > 1:
            row["host_allocations_later_steps"] = pool.allocations - alloc_warm
        row["host_pool_held_gib"] = pool.held_bytes / GiB
        if iters:
            t = time_fwd_bwd(lambda: fn(*leaves), do, iters=iters, warmup=0, leaves=leaves)
            t.pop("peak_bytes")  # the peak is the one of the untimed steps above
            row.update(t)
            row["tflops_per_gpu"] = causal_flops_fwd_bwd(1, H, seq, D) / world / (t["fwd_bwd_ms"] * 1e-3) / 1e12
    except OOM as exc:
        row["oom"] = True
        row["error"] = str(exc).split("\n")[0][:300]
        peaks = [Memory.peak() - base]
    # The slowest rank's peak is what must fit.
    p = torch.tensor([max(peaks), float(row.get("oom", False))], device=device, dtype=torch.float64)
    dist.all_reduce(p, op=dist.ReduceOp.MAX)
    row["oom"] = bool(p[1].item())
    row["inputs_gib"] = base / GiB
    row["peak_gib"] = (base + p[0].item()) / GiB
    row["working_gib"] = p[0].item() / GiB
    row["state_gib"] = (p[0].item() - returned) / GiB
    if not Memory.cuda:  # no allocator counters on CPU: no memory figures rather than zeros
        for key in ("retained_after_forward_gib", "inputs_gib", "peak_gib", "working_gib", "state_gib"):
            row[key] = None
    for t in leaves:
        t.grad = None
    del q, k, v, do, leaves
    Memory.empty_cache()
    pool.release()  # shapes change with S: start the next size from an empty pool
    return row


def overlap_from_trace(path):
    """From a Kineto trace: time of host<->device copies, and how much of it ran while a kernel ran on
    another stream (the copies the offload hides behind compute)."""
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") == "kernel")
    # merge kernel intervals into a union
    union = []
    for a, b in kernels:
        if union and a <= union[-1][1]:
            union[-1][1] = max(union[-1][1], b)
        else:
            union.append([a, b])
    copies = {"HtoD": [], "DtoH": []}
    for e in ev:
        if e.get("cat") == "gpu_memcpy":
            for kind in copies:
                if kind in e.get("name", ""):
                    copies[kind].append((e["ts"], e["ts"] + e["dur"], e.get("args", {}).get("bytes", 0)))
    import bisect
    starts = [u[0] for u in union]

    def covered(a, b):
        tot, i = 0.0, max(0, bisect.bisect_right(starts, a) - 1)
        while i < len(union) and union[i][0] < b:
            tot += max(0.0, min(b, union[i][1]) - max(a, union[i][0]))
            i += 1
        return tot

    out = {"kernel_busy_ms": sum(b - a for a, b in union) / 1e3,
           "span_ms": (max(b for _, b in union) - min(a for a, _ in union)) / 1e3 if union else 0.0}
    for kind, lst in copies.items():
        busy = sum(b - a for a, b, _ in lst)
        hidden = sum(covered(a, b) for a, b, _ in lst)
        nbytes = sum(n for _, _, n in lst)
        out[kind] = {"copies": len(lst), "gib": nbytes / GiB, "copy_ms": busy / 1e3,
                     "overlapped_with_kernels_ms": hidden / 1e3,
                     "overlap_fraction": hidden / busy if busy else None,
                     "gb_per_s_while_copying": nbytes / (busy * 1e-6) / 1e9 if busy else None}
    return out


def traced_overlap(args, topo, device, dtype, rank, world):
    """One traced fwd+bwd with offload: are the host copies hidden behind the kernels?"""
    n = args.trace_seq // world
    q, k, v, do = make_inputs(n, device, seed=3, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    fn = runner(f"offload:{args.trace_chunk}", topo, args.kernel, None)
    one_step(fn, *leaves, do)  # warm: pool allocated, kernels loaded
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        one_step(fn, *leaves, do)
        torch.cuda.synchronize()
    path = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"fpdt_trace_rank{rank}.json")
    prof.export_chrome_trace(path)
    ov = overlap_from_trace(path)
    ov.update(total_tokens=args.trace_seq, chunk_size=args.trace_chunk)
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    os.remove(path)
    return ov


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="sdpa_cudnn")
    ap.add_argument("--ulysses", type=int, default=0, help="default: all ranks")
    ap.add_argument("--ring", type=int, default=1)
    ap.add_argument("--mem-seqs", default="131072,262144,524288", help="total tokens of the memory sweep")
    ap.add_argument("--mem-modes", default="unchunked,deepspeed,chunk:32768,offload:32768")
    ap.add_argument("--fit-seqs", default="1048576", help="larger S tried for --fit-modes only")
    ap.add_argument("--fit-modes", default="offload:65536,unchunked")
    ap.add_argument("--thr-seq", type=int, default=262144, help="total tokens of the chunk-size sweep")
    ap.add_argument("--chunks", default="16384,32768,65536,131072")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--trace-seq", type=int, default=131072, help="0: no trace (CUDA only)")
    ap.add_argument("--trace-chunk", type=int, default=16384)
    ap.add_argument("--exact-seq", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="")
    args = ap.parse_args()

    rank, world, device = init_distributed()
    dtype = DTYPES[args.dtype]
    U = args.ulysses or world // args.ring
    topo = Topology(U, args.ring)
    payload = record_header(world, args.commit)
    q0 = torch.empty(1, 8, H, D, device=device, dtype=dtype)
    payload.update(heads=H, kv_heads=HKV, head_dim=D, dtype=args.dtype, causal=True, batch=1,
                   ulysses=U, ring=args.ring, kernel_requested=args.kernel,
                   kernel_resolved=get_kernel(args.kernel, q0, q0[:, :, :HKV]).name,
                   gpu_memory_gib=Memory.total(device) / GiB)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    ex_chunks = [args.exact_seq // args.ring // 4, args.exact_seq // args.ring // 2]
    key = "exactness_bf16_vs_unchunked" if dtype == torch.bfloat16 else f"exactness_{args.dtype}_vs_unchunked"
    payload[key] = exactness(topo, args.kernel, device, args.exact_seq, ex_chunks, dtype)
    default_pool().release()  # the first measured row starts from an empty pool
    log("exactness:", payload[key])

    ds_attn = None
    if "deepspeed" in args.mem_modes:
        import deepspeed
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        from bench.bench_attention import deepspeed_attention
        ds_attn = deepspeed_attention(topo.sp_group)

    def show(r):
        t = f"{r['fwd_bwd_ms']:9.1f} ms {r['tflops_per_gpu']:6.1f} TFLOP/s" if "fwd_bwd_ms" in r else ""
        log(f"{r['mode']:>16} S={r['total_tokens']:>8} " + ("OOM" if r["oom"] else
            f"peak {r['peak_gib'] or 0:7.2f} GiB working {r['working_gib'] or 0:7.2f} "
            f"state {r['state_gib'] or 0:7.2f} {t}"))

    t0 = time.time()
    memory = []
    for seq in [int(s) for s in args.mem_seqs.split(",") if s]:
        for mode in args.mem_modes.split(","):
            steps = 2 if mode.startswith("offload") else 1  # the second step must allocate no host memory
            memory.append(measure(mode, seq, topo, args.kernel, ds_attn, device, iters=0, steps=steps,
                                  dtype=dtype))
            show(memory[-1])
    for seq in [int(s) for s in args.fit_seqs.split(",") if s]:
        for mode in args.fit_modes.split(","):
            if any(r["oom"] for r in memory if r["mode"] == mode):
                continue  # already out of memory at a shorter S
            memory.append(measure(mode, seq, topo, args.kernel, ds_attn, device, iters=0, dtype=dtype))
            show(memory[-1])
    payload["memory"] = memory
    log(f"memory sweep {time.time() - t0:.0f}s")
    if rank == 0:
        write_json(args.out, payload)  # a run cut short keeps what it measured

    t0 = time.time()
    thr = []
    chunks = [c for c in args.chunks.split(",") if c]
    modes = ["unchunked"] + [f"{m}:{c}" for c in chunks for m in ("offload", "chunk")] if chunks else []
    for mode in modes:
        thr.append(measure(mode, args.thr_seq, topo, args.kernel, ds_attn, device, iters=args.iters,
                           dtype=dtype))
        show(thr[-1])
    base = next((r for r in thr if r["mode"] == "unchunked" and "tflops_per_gpu" in r), None)
    for r in thr:
        if base and "tflops_per_gpu" in r:
            r["vs_unchunked"] = r["tflops_per_gpu"] / base["tflops_per_gpu"]
    payload["throughput"] = thr
    log(f"throughput sweep {time.time() - t0:.0f}s")
    if rank == 0:
        write_json(args.out, payload)

    if args.trace_seq and Memory.cuda:
        payload["overlap_trace"] = traced_overlap(args, topo, device, dtype, rank, world)
        log("overlap:", payload["overlap_trace"])

    if rank == 0:
        write_json(args.out, payload)
        log(f"{'mode':>16} {'tokens':>8} {'peak GiB':>9} {'state GiB':>9} {'TFLOP/s':>8} {'x unchunked':>11}")
        for r in memory + thr:
            log(f"{r['mode']:>16} {r['total_tokens']:>8} {'OOM' if r['oom'] else format(r['peak_gib'] or 0, '9.2f'):>9} "
                f"{r.get('state_gib') or 0:9.2f} {r.get('tflops_per_gpu', 0):8.1f} {r.get('vs_unchunked', 0):11.3f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
