"""Distributed attention on GPUs: kernel self-check, bf16 exactness, and fwd+bwd throughput against the
single-GPU kernel and DeepSpeed's Ulysses ``DistributedAttention``, all in one run.

    torchrun --nproc_per_node N bench/bench_attention.py --kernel sdpa_cudnn --out $OUT/attention.json

Llama-3-8B attention shapes (32 query heads, 8 kv heads, head_dim 128), causal, bf16, batch 1.
Without CUDA it runs on CPU ranks (gloo) as a smoke test of the script: small --seqs, --dtype float32.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import (DTYPES, HKV, D, H, Memory, causal_flops_fwd_bwd,  # noqa: E402
                          init_distributed, make_inputs, record_header, rel,
                          time_interleaved, write_json)
from ds_longctx.attention import attention  # noqa: E402
from ds_longctx.kernels import KERNELS, get_kernel  # noqa: E402
from ds_longctx.layout import shard, unshard  # noqa: E402
from ds_longctx.topology import Topology  # noqa: E402




def kernel_check(device):
    """Every GPU kernel present against the fp32 reference kernel on the same bf16 inputs: out, lse and
    the gradients computed from the kernel's own out/lse. Also the split form the ring relies on: two
    key halves merged through their lse, and backward of each half with the merged out/lse."""
    from ds_longctx.attention.merge import merge_

    ref = KERNELS["reference"]
    g = torch.Generator(device=device).manual_seed(0)
    S = 2048
    q = torch.randn(1, S, 8, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, S, 2, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, S, 2, D, device=device, dtype=torch.bfloat16, generator=g)
    do = torch.randn(1, S, 8, D, device=device, dtype=torch.bfloat16, generator=g)
    scale = D ** -0.5
    results = {}
    for name, kern in KERNELS.items():
        if name == "reference" or not kern.available() or kern.supports(q, k) is not None:
            continue
        entry = {}
        try:
            for causal in (True, False):
                r_out, r_lse = ref.forward(q, k, v, causal, scale)
                r_grads = ref.backward(do, q, k, v, r_out, r_lse, causal, scale)
                out, lse = kern.forward(q, k, v, causal, scale)
                grads = kern.backward(do, q, k, v, out, lse, causal, scale)
                tag = "causal" if causal else "full"
                entry[tag] = {"out": rel(out, r_out), "lse": rel(lse, r_lse),
                              **{n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, r_grads)}}
            # Ring split: keys [0, S/2) and [S/2, S) without mask, merged.
            h = S // 2
            o1, l1 = kern.forward(q, k[:, :h], v[:, :h], False, scale)
            o2, l2 = kern.forward(q, k[:, h:], v[:, h:], False, scale)
            acc, lse = o1.float(), l1.float().clone()
            merge_(acc, lse, o2, l2)
            out = acc.to(q.dtype)
            g1 = kern.backward(do, q, k[:, :h], v[:, :h], out, lse, False, scale)
            g2 = kern.backward(do, q, k[:, h:], v[:, h:], out, lse, False, scale)
            r_out, r_lse = ref.forward(q, k, v, False, scale)
            r_grads = ref.backward(do, q, k, v, r_out, r_lse, False, scale)
            entry["split_merge"] = {
                "out": rel(out, r_out), "dq": rel(g1[0].float() + g2[0].float(), r_grads[0]),
                "dk": rel(torch.cat([g1[1], g2[1]], 1), r_grads[1]), "dv": rel(torch.cat([g1[2], g2[2]], 1), r_grads[2])}
        except Exception as exc:  # noqa: BLE001 - reported, the rest of the bench goes on
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        results[name] = entry
    return results



def deepspeed_attention(sp_group):
    """DeepSpeed Ulysses with the cuDNN SDPA local kernel (kv heads repeated locally, as SDPA needs)."""
    from deepspeed.sequence.layer import DistributedAttention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def local(q, k, v):
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        backend = SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
        return o.transpose(1, 2)

    return DistributedAttention(local, sp_group, scatter_idx=2, gather_idx=1)


def exactness(topos, kernel, device, seq, dtype=torch.bfloat16):
    """Distributed result vs the single-GPU kernel on the full sequence (out, dq, dk, dv), in ``dtype``."""
    q, k, v, do = make_inputs(seq, device, seed=1, dtype=dtype)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    single = topos["single"]
    ref_out = attention(*full, single, causal=True, kernel=kernel)
    ref_out.backward(do)
    res = {}
    for name, topo in topos.items():
        if name == "single":
            continue
        loc = [shard(t, topo).detach().requires_grad_() for t in (q, k, v)]
        out = attention(*loc, topo, causal=True, kernel=kernel)
        out.backward(shard(do, topo))
        got = [unshard(out.detach(), topo)] + [unshard(t.grad, topo) for t in loc]
        res[name] = {n: rel(a, b.grad if n != "out" else ref_out) for n, a, b in
                     zip(("out", "dq", "dk", "dv"), got, [None] + full)}
    return res


def error_growth(topos, kernel, device, seq):
    """bf16 relative error of out, dq, dk, dv against a float64 reference (the reference kernel in float64 on
    one rank) for one rank and for each distributed topology, and each topology's largest error ratio to one
    rank's: the ring's error must not grow with its size (the CPU test asserts <= 1.5 for ring 8)."""
    q, k, v, do = (t.double() for t in make_inputs(seq, device, seed=2, dtype=torch.bfloat16))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = attention(*ref, topos["single"], causal=True, kernel="reference")
    ref_out.backward(do)
    want = [ref_out.detach()] + [t.grad for t in ref]
    errors = {}
    for name, topo in topos.items():
        loc = [shard(t.bfloat16(), topo).detach().requires_grad_() for t in (q, k, v)]
        out = attention(*loc, topo, causal=True, kernel=kernel)
        out.backward(shard(do.bfloat16(), topo))
        got = [unshard(out.detach(), topo)] + [unshard(t.grad, topo) for t in loc]
        errors[name] = {n: rel(a.double(), b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    ratio = {name: max(e[n] / errors["single"][n] for n in e) for name, e in errors.items() if name != "single"}
    return {"seq": seq, "errors": errors, "max_ratio_to_single": ratio}


def chunk_error_growth(kernel, device, seq, counts):
    """bf16 relative error of out, dq, dk, dv against the float64 reference on one rank with the sequence cut
    into ``count`` FPDT chunks (chunk ``seq / count``), for each count, and each count's largest error ratio
    to the unchunked call's. A chunked call computes each key block with the kernel and merges the blocks
    through their lse (``merge_``), as a ring of ``count`` ranks does, so on one GPU this is the ring's
    arithmetic without its transfers: the error must not grow with the number of blocks merged."""
    single = Topology(1, 1)
    q, k, v, do = (t.double() for t in make_inputs(seq, device, seed=2, dtype=torch.bfloat16))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = attention(*ref, single, causal=True, kernel="reference")
    ref_out.backward(do)
    want = [ref_out.detach()] + [t.grad for t in ref]
    errors = {}
    for count in counts:
        chunk = None if count == 1 else seq // count
        loc = [shard(t.bfloat16(), single, chunk_size=chunk).detach().requires_grad_() for t in (q, k, v)]
        out = attention(*loc, single, causal=True, kernel=kernel, chunk_size=chunk)
        out.backward(shard(do.bfloat16(), single, chunk_size=chunk))
        got = [unshard(out.detach(), single, chunk_size=chunk)] + [unshard(t.grad, single, chunk_size=chunk)
                                                                   for t in loc]
        errors[str(count)] = {n: rel(a.double(), b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    base = errors[str(counts[0])]
    ratio = {c: max(e[n] / base[n] for n in e) for c, e in errors.items() if c != str(counts[0])}
    return {"seq": seq, "chunk_counts": list(counts), "errors": errors, "max_ratio_to_unchunked": ratio}


def parse_impl(impl):
    """``"ring:sdpa_cudnn#2"`` -> ("ring", "sdpa_cudnn"): the topology (``_pN`` for a pipelined all-to-all)
    and the kernel when it is not --kernel (a peer in the same run; "" otherwise). After ``#`` comes a tag
    that makes a second row of the same implementation (timing the same thing twice shows what is noise)."""
    base, _, kname = impl.partition("#")[0].partition(":")
    return base, kname


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="sdpa_cudnn")
    ap.add_argument("--seqs", default="131072,262144,524288,1048576", help="total tokens")
    ap.add_argument("--impls", default="single,ulysses,ring,hybrid,deepspeed,single#2",
                    help="timed in rounds, in this order: single, ulysses, ring, hybrid (4+ ranks), deepspeed; "
                         "':KERNEL' for another kernel than --kernel, '_pN' for an all-to-all pipelined over N "
                         "head chunks, '#TAG' for a second row of the same (single#2: the noise of the run)")
    ap.add_argument("--long-impls", default="ulysses", help="impls still run at --long-from tokens and more")
    ap.add_argument("--long-from", type=int, default=1048576)
    ap.add_argument("--short-max", type=int, default=1 << 40, help="impls not in --impls-long-enough stop here")
    ap.add_argument("--impls-long-enough", default="single,ulysses,ring,hybrid,deepspeed")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--exact-seq", type=int, default=16384, help="total tokens of the exactness check")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--error-seq", type=int, default=4096,
                    help="total tokens of the bf16-vs-float64 error check of every topology (0: skip)")
    ap.add_argument("--error-chunks", default="",
                    help="comma-separated FPDT chunk counts (1 first) of a one-rank bf16-vs-float64 error check at "
                         "--error-seq tokens: the ring's block-merge arithmetic on one GPU (empty: skip)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="", help="git commit of the code measured (recorded in the JSON)")
    args = ap.parse_args()

    rank, world, device = init_distributed()
    dtype = DTYPES[args.dtype]
    topos = {"single": Topology(1, 1), "ulysses": Topology(world, 1), "ring": Topology(1, world)}
    if world >= 4:
        topos["hybrid"] = Topology(2, world // 2)
    payload = record_header(world, args.commit)
    payload.update(heads=H, kv_heads=HKV, head_dim=D, dtype=args.dtype, causal=True, batch=1)
    q0 = torch.empty(1, 8, H, D, device=device, dtype=dtype)
    payload["kernel_requested"] = args.kernel
    payload["kernel_resolved"] = get_kernel(args.kernel, q0, q0[:, :, :HKV]).name

    if rank == 0:
        payload["kernel_check"] = kernel_check(device)
        print("kernel check:", payload["kernel_check"], flush=True)
    payload["exactness_bf16" if dtype == torch.bfloat16 else "exactness_" + args.dtype] = ex = exactness(
        topos, args.kernel, device, args.exact_seq, dtype)
    if rank == 0:
        print("exactness:", ex, flush=True)
    if args.error_seq:
        payload["bf16_error_vs_float64"] = growth = error_growth(topos, args.kernel, device, args.error_seq)
        if rank == 0:
            print("bf16 error vs float64:", growth["max_ratio_to_single"], flush=True)
    if args.error_chunks and rank == 0:
        counts = [int(c) for c in args.error_chunks.split(",") if c]
        payload["bf16_error_vs_float64_chunks"] = cg = chunk_error_growth(args.kernel, device, args.error_seq,
                                                                           counts)
        print("bf16 error vs float64 by chunk count:", cg["max_ratio_to_unchunked"], flush=True)

    ds_attn = None
    impls = args.impls.split(",")
    if any(parse_impl(i)[0] == "deepspeed" for i in impls):
        import deepspeed
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        ds_attn = deepspeed_attention(topos["ulysses"].sp_group)

    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        long = seq >= args.long_from
        per_gpu = seq // world
        chosen = []
        for impl in impls:
            base_impl, _ = parse_impl(impl)
            if base_impl.partition("_p")[0] not in topos and base_impl != "deepspeed":
                continue
            if long and impl not in args.long_impls.split(","):
                continue
            if seq > args.short_max and impl not in args.impls_long_enough.split(",") + args.long_impls.split(","):
                continue
            chosen.append(impl)
        # One set of inputs per length, shared by all implementations (the same local shapes for each).
        q, k, v, do = make_inputs(per_gpu, device, seed=seq, dtype=dtype)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        fns = {}
        for impl in chosen:
            base_impl, kname = parse_impl(impl)
            kname = kname or args.kernel
            if base_impl == "deepspeed":
                fns[impl] = lambda: ds_attn(*leaves, batch_dim_idx=0)  # noqa: E731
            else:
                # "ulysses_p4": the Ulysses topology with the all-to-all pipelined over 4 head chunks.
                base, _, p = base_impl.partition("_p")
                topo, opts = topos[base], ({"pipeline_chunks": int(p)} if p else {})
                fns[impl] = lambda topo=topo, opts=opts, kname=kname: attention(  # noqa: E731
                    *leaves, topo, causal=True, kernel=kname, **opts)
        Memory.empty_cache()
        iters = 1 if long else (args.iters if seq < 524288 else 2)
        timed = time_interleaved(fns, do, leaves, iters=iters, warmup=1)
        for impl in chosen:
            base_impl, kname = parse_impl(impl)
            kname = kname or args.kernel
            flops = causal_flops_fwd_bwd(1, H, seq, D) / world
            if base_impl == "single":  # the kernel alone on this GPU's share of tokens
                flops = causal_flops_fwd_bwd(1, H, per_gpu, D)
            t = timed[impl]
            row = {"impl": impl, "total_tokens": seq, "tokens_per_gpu": per_gpu, "rounds": iters,
                   "kernel": f"sdpa_{'cudnn' if q.is_cuda else 'math'} (DeepSpeed local attention)"
                   if base_impl == "deepspeed" else get_kernel(kname, q, k).name,
                   "peak_mem_gib": t.pop("peak_bytes", 0) / 2**30 if Memory.cuda else None}
            row.update(t)
            if not t.get("oom"):
                row["tflops_per_gpu"] = flops / (t["fwd_bwd_ms"] * 1e-3) / 1e12
            rows.append(row)
            if rank == 0:
                print(f"{impl:>20} S={seq:>8} per_gpu={per_gpu:>7} "
                      + ("OOM" if t.get("oom") else f"{row['fwd_bwd_ms']:9.1f} ms "
                         f"{row['tflops_per_gpu']:6.1f} TFLOP/s/GPU (spread {row['spread']:.3f})"), flush=True)
        del q, k, v, do, leaves, fns
    # Ratios within the run: against the single-GPU kernel at the same tokens per GPU, and against DeepSpeed.
    by = {(r["impl"], r["total_tokens"]): r for r in rows if "tflops_per_gpu" in r}
    for r in rows:
        base_impl, kname = parse_impl(r["impl"])
        single = by.get(("single" + (":" + kname if kname else ""), r["total_tokens"]))
        cudnn = by.get(("single:sdpa_cudnn", r["total_tokens"])) or (
            by.get(("single", r["total_tokens"])) if args.kernel == "sdpa_cudnn" else None)
        if base_impl == "deepspeed":  # its local kernel is cuDNN SDPA, whatever --kernel says
            single = cudnn
        ds = by.get(("deepspeed", r["total_tokens"]))
        if "tflops_per_gpu" in r and single:  # the same kernel alone on one GPU at the same tokens per GPU
            r["vs_single_gpu_kernel"] = r["tflops_per_gpu"] / single["tflops_per_gpu"]
        if "tflops_per_gpu" in r and cudnn:
            r["vs_single_gpu_cudnn"] = r["tflops_per_gpu"] / cudnn["tflops_per_gpu"]
        if "tflops_per_gpu" in r and ds:
            r["vs_deepspeed_ulysses_cudnn"] = r["tflops_per_gpu"] / ds["tflops_per_gpu"]
    payload["results"] = rows
    if rank == 0:
        write_json(args.out, payload)
        print(f"{'impl':>20} {'tokens':>8} {'TFLOP/s':>8} {'xsingle':>8} {'xcudnn':>7} {'xDS':>6}")
        for r in rows:
            print(f"{r['impl']:>20} {r['total_tokens']:>8} {r.get('tflops_per_gpu', 0):8.1f} "
                  f"{r.get('vs_single_gpu_kernel', 0):8.3f} {r.get('vs_single_gpu_cudnn', 0):7.3f} "
                  f"{r.get('vs_deepspeed_ulysses_cudnn', 0):6.3f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
