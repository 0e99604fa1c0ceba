"""The lean RMSNorm's forward + backward, eager tiles against compiled (fused) tiles, on one GPU.

    python bench/bench_norms.py --out $OUT/norms_h200x1.json

For each ``--tokens`` (rows of ``--hidden`` bf16 values): the median milliseconds of a forward and backward
(CUDA events, after a warm-up that compiles), the bytes it must move at least (input, upstream gradient and
weight read, output and input gradient written: 8 bytes an element) over that time, and the largest difference
of the fused output and input gradient from the eager ones in bf16 rounding steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import record_header, write_json  # noqa: E402
from ds_longctx.memory.norms import rms_norm  # noqa: E402


def timed_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="65536,131072,262144")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_norms needs a GPU")
    payload = {**record_header(1, args.commit), "hidden": args.hidden, "results": []}
    weight = (torch.randn(args.hidden, device="cuda") * 0.3 + 1).to(torch.bfloat16).requires_grad_()
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = (torch.randn(tokens, args.hidden, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
        g = torch.randn(tokens, args.hidden, device="cuda").to(torch.bfloat16)
        row = {"tokens": tokens}
        outs = {}
        for name, fused in (("eager", False), ("fused", True)):
            def step():
                y = rms_norm(x, weight, 1e-5, fused=fused)
                return (y, *torch.autograd.grad(y, (x, weight), g))
            outs[name] = step()  # warm-up (the compile for fused)
            ms = timed_ms(step, args.repeats)
            row[f"{name}_ms"] = ms
            row[f"{name}_gb_per_s"] = 8 * tokens * args.hidden / (ms * 1e-3) / 1e9
        ulp = outs["eager"][0].detach().abs().float() * 2 ** -7 + 1e-30
        row["output_max_steps"] = float(((outs["fused"][0] - outs["eager"][0]).abs().float() / ulp).max())
        row["dx_rel_diff"] = float((outs["fused"][1] - outs["eager"][1]).float().norm() / outs["eager"][1].float().norm())
        row["speedup"] = row["eager_ms"] / row["fused_ms"]
        payload["results"].append(row)
        print(row, flush=True)
        del x, g, outs
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
