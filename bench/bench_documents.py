"""Packed documents: the cost of keeping attention inside each document, forward + backward.

Launch: ``torchrun --nproc_per_node N bench/bench_documents.py --out results.json`` (Llama-3-8B heads, causal,
bf16). For each document length, the sequence of ``--seq`` tokens is packed with documents of that length
(the last one shorter if it does not divide) and timed in rounds (``common.time_interleaved``):

* ``packed``: ds_longctx with ``cu_seqlens`` on the sequence-parallel topology ``--topology`` (Ulysses over
  all ranks, or the ring); on one GPU the kernel runs once per document;
* ``unpacked``: the same without documents, i.e. causal attention across the whole sequence: what a packed
  batch costs when its documents are ignored;
* ``fa4_varlen`` (one GPU, when FlashAttention-4 is installed): ``flash_attn_varlen_func`` over the packed
  sequence, one kernel launch for all documents: the single-GPU reference for packed attention.

Rates count only the useful work, the causal attention inside each document (``unpacked`` counts its own,
the whole sequence). ``exactness`` compares ``packed`` with one process attending document by document with
the same kernel (bf16, relative error of out, dq, dk, dv).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (D, DTYPES, HKV, H, Memory, causal_flops_fwd_bwd, init_distributed, make_inputs,  # noqa: E402
                    record_header, rel, time_interleaved, write_json)

from ds_longctx.attention import attention  # noqa: E402
from ds_longctx.kernels import get_kernel  # noqa: E402
from ds_longctx.layout import shard, unshard  # noqa: E402
from ds_longctx.topology import Topology  # noqa: E402


def boundaries(seq: int, doc_len: int):
    """``[0, doc_len, 2 * doc_len, ..., seq]``."""
    return list(range(0, seq, doc_len)) + [seq]


def fa4_varlen():
    """FlashAttention-4's varlen function, or None when it is not installed or cannot run here."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return None
    try:
        from flash_attn.cute import flash_attn_varlen_func  # type: ignore
    except Exception:  # noqa: BLE001 - absent or broken install
        return None
    return flash_attn_varlen_func


def varlen_call(fn, q, k, v, cu, max_len):
    """``[1, S, h, D]`` inputs through ``fn`` as one packed batch of documents -> ``[1, S, H, D]``."""
    res = fn(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
             causal=True, softmax_scale=D ** -0.5)
    out = res[0] if isinstance(res, tuple) else res
    return out.unsqueeze(0)


def exactness(topo, kernel, device, seq, doc_len, dtype):
    """``packed`` against one process attending document by document with the same kernel."""
    q, k, v, do = make_inputs(seq, device, seed=3, dtype=dtype)
    cu = boundaries(seq, doc_len)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    single = Topology(1, 1)
    ref = torch.cat([attention(*(t[:, a:b] for t in full), single, causal=True, kernel=kernel)
                     for a, b in zip(cu, cu[1:])], dim=1)
    ref.backward(do)
    loc = [shard(t, topo).detach().requires_grad_() for t in (q, k, v)]
    out = attention(*loc, topo, causal=True, kernel=kernel, cu_seqlens=cu)
    out.backward(shard(do, topo))
    got = [unshard(out.detach(), topo)] + [unshard(t.grad, topo) for t in loc]
    want = [ref.detach()] + [t.grad for t in full]
    return {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--seq", type=int, default=131072, help="total tokens")
    ap.add_argument("--doc-lens", default="1024,4096,16384,65536", help="document lengths, one row set each")
    ap.add_argument("--impls", default="packed,unpacked,fa4_varlen")
    ap.add_argument("--topology", default="ulysses", choices=["ulysses", "ring"], help="how the ranks split")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--exact-seq", type=int, default=16384)
    ap.add_argument("--exact-doc", type=int, default=3000, help="document length of the exactness check")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="")
    args = ap.parse_args()

    rank, world, device = init_distributed()
    dtype = DTYPES[args.dtype]
    topo = Topology(world, 1) if args.topology == "ulysses" else Topology(1, world)
    payload = record_header(world, args.commit)
    payload.update(heads=H, kv_heads=HKV, head_dim=D, dtype=args.dtype, causal=True, batch=1, seq=args.seq,
                   topology=args.topology)
    q0 = torch.empty(1, 8, H, D, device=device, dtype=dtype)
    kernel = get_kernel(args.kernel, q0, q0[:, :, :HKV])
    payload["kernel_requested"], payload["kernel_resolved"] = args.kernel, kernel.name
    payload["exactness"] = exactness(topo, args.kernel, device, args.exact_seq, args.exact_doc, dtype)
    if rank == 0:
        print("exactness:", payload["exactness"], flush=True)
    varlen = fa4_varlen() if world == 1 else None
    impls = [i for i in args.impls.split(",") if i != "fa4_varlen" or varlen is not None]
    payload["skipped"] = [i for i in args.impls.split(",") if i not in impls]

    rows = []
    seq, per_gpu = args.seq, args.seq // world
    q, k, v, do = make_inputs(per_gpu, device, seed=seq, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    for doc_len in [int(x) for x in args.doc_lens.split(",")]:
        cu = boundaries(seq, doc_len)
        cu_dev = torch.tensor(cu, dtype=torch.int32, device=device)
        fns = {}
        for impl in impls:
            if impl == "packed":
                fns[impl] = lambda cu=cu: attention(*leaves, topo, causal=True, kernel=args.kernel,  # noqa: E731
                                                    cu_seqlens=cu)
            elif impl == "unpacked":
                fns[impl] = lambda: attention(*leaves, topo, causal=True, kernel=args.kernel)  # noqa: E731
            elif impl == "fa4_varlen":
                fns[impl] = lambda cu_dev=cu_dev: varlen_call(varlen, *leaves, cu_dev, doc_len)  # noqa: E731
            else:
                raise SystemExit(f"unknown impl {impl}")
        Memory.empty_cache()
        timed = time_interleaved(fns, do, leaves, iters=args.iters, warmup=1)
        useful = sum(causal_flops_fwd_bwd(1, H, b - a, D) for a, b in zip(cu, cu[1:])) / world
        for impl in impls:
            t = timed[impl]
            flops = causal_flops_fwd_bwd(1, H, seq, D) / world if impl == "unpacked" else useful
            row = {"impl": impl, "doc_len": doc_len, "documents": len(cu) - 1, "total_tokens": seq,
                   "tokens_per_gpu": per_gpu, "rounds": args.iters,
                   "peak_mem_gib": t.pop("peak_bytes", 0) / 2**30 if Memory.cuda else None}
            row.update(t)
            if not t.get("oom"):
                row["tflops_per_gpu"] = flops / (t["fwd_bwd_ms"] * 1e-3) / 1e12
            rows.append(row)
        by = {r["impl"]: r for r in rows if r["doc_len"] == doc_len and "tflops_per_gpu" in r}
        for r in rows:
            if r["doc_len"] != doc_len or "tflops_per_gpu" not in r:
                continue
            if "fa4_varlen" in by and r["impl"] != "fa4_varlen":
                r["vs_fa4_varlen"] = r["tflops_per_gpu"] / by["fa4_varlen"]["tflops_per_gpu"]
            if "unpacked" in by and r["impl"] != "unpacked":
                # > 1: faster than attending across the whole sequence (less work, per-document calls)
                r["time_vs_unpacked"] = by["unpacked"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            if rank == 0:
                print(f"{r['impl']:>11} doc={doc_len:>7} {r['fwd_bwd_ms']:9.2f} ms {r['tflops_per_gpu']:6.1f} "
                      f"TFLOP/s/GPU xvarlen {r.get('vs_fa4_varlen', 0):.3f} "
                      f"speedup vs unpacked {r.get('time_vs_unpacked', 0):.2f}", flush=True)
    payload["results"] = rows
    if rank == 0:
        write_json(args.out, payload)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
