"""Render the committed benchmark JSON under bench/results/ as Markdown tables (the numbers in README and
docs come from here).

    python bench/report.py > docs/results.md
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.report_common import f, header, load  # noqa: E402
from bench.report_long import long_sequence_tables, profile_tables  # noqa: E402
from bench.report_planner import plan_check_tables, plan_longest_tables, plan_max_tables  # noqa: E402

def attention_tables():
    out = []
    for name, d in load("attention_*.json"):
        out.append(header(name, d))
        out.append(f"Kernel `{d['kernel_requested']}` resolved to `{d['kernel_resolved']}`; Llama-3-8B heads "
                   f"({d['heads']} q, {d['kv_heads']} kv, D={d['head_dim']}), causal, bf16, fwd+bwd.\n")
        out.append("| impl | kernel | total tokens | tokens/GPU | ms | TFLOP/s/GPU | x same kernel on 1 GPU | "
                   "x cuDNN on 1 GPU | x DeepSpeed Ulysses (cuDNN) | spread |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in d["results"]:
            if r.get("oom"):
                out.append(f"| {r['impl']} | {r['kernel']} | {r['total_tokens']} | {r['tokens_per_gpu']} | OOM ||||||")
                continue
            out.append(f"| {r['impl']} | {r['kernel']} | {r['total_tokens']} | {r['tokens_per_gpu']} | "
                       f"{r['fwd_bwd_ms']:.1f} | {r['tflops_per_gpu']:.1f} | "
                       f"{'' if r['impl'] == 'deepspeed' else f(r.get('vs_single_gpu_kernel'))} | "
                       f"{f(r.get('vs_single_gpu_cudnn'))} | {f(r.get('vs_deepspeed_ulysses_cudnn'))} | "
                       f"{f(r.get('spread'))} |")
        if any("spread" in r for r in d["results"]):
            out.append(f"\nTimed in rounds ({d['results'][0].get('rounds')} per length, each implementation once "
                       "per round in the order above, one set of inputs); *spread* = (max - min) / median of a "
                       "row's round times; `single#2` is the kernel timed again at the end of each round.")
        chk = d.get("kernel_check", {})
        if chk:
            out.append("\nKernel check against the fp32 reference kernel (relative error, bf16 inputs, S=2048):\n")
            out.append("| kernel | case | out | lse | dq | dk | dv |")
            out.append("|---|---|---|---|---|---|---|")
            for k, cases in chk.items():
                for case, e in cases.items():
                    if case == "error":
                        out.append(f"| {k} | error: {e} ||||||")
                        continue
                    out.append(f"| {k} | {case} | " + " | ".join(f(e.get(n), ".1e") for n in
                                                                ("out", "lse", "dq", "dk", "dv")) + " |")
        out.append("")
    return out


def fpdt_tables():
    out = []
    for name, d in load("fpdt_*.json"):
        out.append(header(name, d))
        out.append(f"Topology ulysses={d['ulysses']} x ring={d['ring']}, kernel `{d['kernel_resolved']}`, one "
                   f"attention layer fwd+bwd, Llama-3-8B heads, causal, bf16. GiB from the CUDA caching "
                   f"allocator; *state* = peak minus the layer's inputs (q, k, v, dout) and what it must return "
                   f"(out, dq, dk, dv); *retained* = what the layer's graph holds between forward and backward, "
                   f"beyond its output.\n")
        ex = d.get("exactness_bf16_vs_unchunked", {})
        if ex:
            worst = max(max(e.values()) for e in ex.values())
            out.append(f"Exactness: chunked and offloaded against unchunked, bf16, worst relative error over "
                       f"out/dq/dk/dv and {len(ex)} settings: {worst:.1e}.\n")
        if d.get("memory"):
            out.append("| mode | total tokens | peak GiB | state GiB | retained GiB | host allocations, 1st / later steps |")
            out.append("|---|---|---|---|---|---|")
            for r in d["memory"]:
                if r["oom"]:
                    out.append(f"| {r['mode']} | {r['total_tokens']} | OOM ||||")
                    continue
                later = r.get("host_allocations_later_steps")
                out.append(f"| {r['mode']} | {r['total_tokens']} | {r['peak_gib']:.2f} | {r['state_gib']:.2f} | "
                           f"{r['retained_after_forward_gib']:.2f} | {r['host_allocations_first_step']}"
                           f"{'' if later is None else f' / {later}'} |")
            out.append("")
        if d.get("throughput"):
            out.append("| mode | total tokens | ms | TFLOP/s/GPU | x unchunked | peak GiB | state GiB |")
            out.append("|---|---|---|---|---|---|---|")
        for r in d.get("throughput", []):
            if "fwd_bwd_ms" not in r:
                continue
            out.append(f"| {r['mode']} | {r['total_tokens']} | {r['fwd_bwd_ms']:.1f} | {r['tflops_per_gpu']:.1f} | "
                       f"{f(r.get('vs_unchunked'))} | {r['peak_gib']:.2f} | {r['state_gib']:.2f} |")
        ov = d.get("overlap_trace")
        if ov:
            out.append(f"\nCUDA trace of one fwd+bwd, offload, {ov['total_tokens']} tokens, chunk {ov['chunk_size']} "
                       f"(kernels busy {ov['kernel_busy_ms']:.0f} ms of a {ov['span_ms']:.0f} ms span):\n")
            out.append("| copies | count | GiB | copy ms | ms overlapped with kernels | overlapped | GB/s |")
            out.append("|---|---|---|---|---|---|---|")
            for kind in ("HtoD", "DtoH"):
                c = ov[kind]
                out.append(f"| {kind} | {c['copies']} | {c['gib']:.2f} | {c['copy_ms']:.1f} | "
                           f"{c['overlapped_with_kernels_ms']:.1f} | {f(c['overlap_fraction'])} | "
                           f"{f(c['gb_per_s_while_copying'], '.1f')} |")
        out.append("")
    return out


def documents_tables():
    out = []
    for name, d in load("documents_*.json"):
        out.append(header(name, d))
        out.append(f"{d['world_size']} GPU(s), topology {d['topology']}, kernel `{d['kernel_requested']}` resolved to "
                   f"`{d['kernel_resolved']}`, {d['seq']} tokens packed with documents of the given length, "
                   f"Llama-3-8B heads, causal, bf16, fwd+bwd. TFLOP/s count the attention inside each document "
                   f"(`unpacked`: across the whole sequence). Exactness of `packed` against attending document "
                   f"by document with the same kernel: " + ", ".join(f"{k} {v:.1e}" for k, v in
                                                                       d["exactness"].items()) + ".\n")
        out.append("| impl | doc length | documents | ms | TFLOP/s/GPU | x FA4 varlen | time of unpacked / this | spread |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in d["results"]:
            if r.get("oom"):
                out.append(f"| {r['impl']} | {r['doc_len']} | {r['documents']} | OOM |||||")
                continue
            out.append(f"| {r['impl']} | {r['doc_len']} | {r['documents']} | {r['fwd_bwd_ms']:.1f} | "
                       f"{r['tflops_per_gpu']:.1f} | {'' if r['impl'] == 'unpacked' else f(r.get('vs_fa4_varlen'))} | "
                       f"{f(r.get('time_vs_unpacked'))} | "
                       f"{f(r.get('spread'))} |")
        out.append("")
    return out


def train_tables():
    rows = load("train_*.json")
    if not rows:
        return []
    out = ["| file | mode | GPUs | seq_len | layers | params | optimizer | vocab | attention | grad. checkpointing | "
           "MLP tiles | loss tiles | tokens/s | model TFLOP/s/GPU | peak GiB | GiB left for backward | loss per step |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in rows:
        lc = d["ds_config"].get("long_context")
        if d["mode"] == "deepspeed":
            attn = f"transformers SDPA ({d.get('ds_sdpa', 'default')})"
        else:
            attn = (f"{lc['ulysses_degree']}x{lc['ring_degree']}, "
                    f"kernel {d['kernel']}" + (f" ({d['kernel_resolved']})" if "kernel_resolved" in d else
                                               " (flash-attn absent: sdpa_cudnn)" if d["kernel"] == "auto"
                                               and d["versions"].get("flash_attn") == "absent" else "")
                    + f", chunk {d['chunk_size']}, offload {d['offload']}"
                    # runs before the option existed had the models' own norms
                    + (", lean RMSNorm" if lc.get("lean_rms_norm") else ""))
        ckpt = str(d["checkpointing"])
        if d["checkpointing"] and lc is not None:
            keep = lc.get("keep_attention_output", False)
            ckpt += (", attention outputs kept for reruns" if keep == "reruns"
                     else ", attention kept" if keep else ", attention recomputed")
            if lc.get("checkpoint_offload"):
                ckpt += ", checkpoints in host memory"
        tiles = (lc or {}).get("mlp_tile_tokens") or "-"
        loss_tiles = (lc or {}).get("loss_tile_tokens") or "-"
        s = d.get("summary") or {}
        losses = ", ".join(format(r["loss"], ".3f") for r in d["steps"])
        res = ("OOM" if "oom" in d else f"fits (probe: {s['probe_layers']} layers' backward)" if "probe_peak_gib" in s
               else f"{s.get('tokens_per_s', 0):,.0f}")
        peak = (f"{d['oom']['peak_gib']:.1f} at OOM" if "oom" in d else
                f(s.get("probe_peak_gib", s.get("peak_gib")), ".1f"))
        left = d["steps"][-1].get("after_forward_gib") if d["steps"] else None  # added to the bench later
        optim = "CPU" if d.get("offload_optimizer") else "GPU"
        out.append(f"| `{name}` | {d['mode']} | {d['world_size']} | {d['seq_len']} | {d['layers']} | "
                   f"{d['params'] / 1e9:.2f}B | {optim} | {d.get('vocab', 256)} | {attn} | {ckpt} | {tiles} | "
                   f"{loss_tiles} | {res} | {f(s.get('tflops_per_gpu'), '.1f')} | {peak} | {f(left, '.1f')} | "
                   f"{losses or '-'} |")
    out.append("")
    for name, d in rows:
        out.append(header(name, d))
    return out


def main():
    print("# Benchmark results\n")
    print("Generated by `python bench/report.py > docs/results.md` from the JSON under `bench/results/`; "
          "each section names its file, the machine, versions, the exact command and the commit measured.\n")
    print("## Distributed attention\n")
    print("\n".join(attention_tables()))
    print("## FPDT chunking and host offload\n")
    print("\n".join(fpdt_tables()))
    print("## Packed documents\n")
    print("\n".join(documents_tables()))
    print("## Training (ZeRO-3, bf16)\n")
    print("\n".join(train_tables()))
    lines = plan_check_tables()
    if lines:
        print("## The planner's predictions against measured steps\n")
        print("\n".join(lines))
    lines = plan_max_tables()
    if lines:
        print("## The planner's longest length, trained\n")
        print("\n".join(lines))
    lines = plan_longest_tables()
    if lines:
        print("## The planner's longest length, predicted\n")
        print("\n".join(lines))
    lines = long_sequence_tables()
    if lines:
        print("## Long sequences: plain ZeRO-3, DeepSpeed's ALST, ds_longctx\n")
        print("\n".join(lines))
    lines = profile_tables()
    if lines:
        print("## Where a step's GPU time goes (torch.profiler)\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
