"""HostStateAdamW on a GPU: the same parameters and moments as ``torch.optim.AdamW(fused=True)``, moments in
page-locked host memory, and its step time against fused AdamW's.

    python bench/check_host_optimizer.py --out $OUT/check_host_optimizer_h200x1.json

Parameters of about ``--mib`` MiB in fp32 (odd sizes: several chunks and a tail each) get the same random
gradients for ``--steps`` steps under both optimizers. Checked:

* parameters and both moments equal fused AdamW's bit for bit (the same kernel, chunk by chunk), with the default
  chunk size, with small chunks (many chunks in flight on the three staging slots), and with the current stream
  kept busy by matmuls queued before each step (an update that lags its copies would read or drain a slot early:
  a missing wait between the streams shows as a difference);
* the moments are host tensors, ``is_pinned()``, and the device holds no moments (what the step adds there is the
  gradients and the staging slots; fused AdamW's adds the gradients and the moments);
* ``state_dict`` / ``load_state_dict`` give host (re-pinned) moments, and training on from them stays equal.

Reported: the median step time of each (CUDA-synchronized wall clock), the PCIe bytes per step (8 per element
each way) and the GB/s they imply. Exits 1 when a check fails. Meant to take well under a minute on one GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import record_header, write_json  # noqa: E402
from ds_longctx.memory.host_optimizer import HostStateAdamW  # noqa: E402

MiB = 2 ** 20
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def make_params(total_mib: float, device) -> list:
    """fp32 parameters of about ``total_mib`` MiB: one large square-ish matrix's worth split into odd sizes."""
    numel = int(total_mib * MiB / 4)
    sizes = [numel // 2 + 12345, numel // 3 - 777, numel - numel // 2 - numel // 3 - 11568, 1000003]
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, generator=g, device=device)) for n in sizes]


def set_grads(params, step: int) -> None:
    g = torch.Generator(device=params[0].device).manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=p.device) * (1 + step)


def busy(device, n: int = 4096, repeats: int = 8) -> None:
    """Queue seconds of work on the current stream, so the update starts long after the copies were issued."""
    a = torch.randn(n, n, device=device)
    for _ in range(repeats):
        a = a @ a
        a = a / a.norm()


def timed_steps(opt, params, first: int, steps: int, keep_busy: bool = False) -> list:
    times = []
    for step in range(first, first + steps):
        set_grads(params, step)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if keep_busy:
            busy(params[0].device)
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def max_abs_diff(ours, theirs) -> float:
    return max((a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item() for a, b in zip(ours, theirs))


def compare(opt, ours, reference, theirs) -> dict:
    """Largest differences of parameters and moments; exact equality of all of them."""
    moments = {name: ([opt.state[p][name] for p in ours], [reference.state[p][name] for p in theirs])
               for name in ("exp_avg", "exp_avg_sq")}
    torch.cuda.synchronize()
    opt.state_dict()  # waits for the copies back to host memory
    out = {"param_max_abs_diff": max_abs_diff(ours, theirs)}
    for name, (a, b) in moments.items():
        out[f"{name}_max_abs_diff"] = max_abs_diff(a, b)
    out["bit_exact"] = all(torch.equal(a.detach().cpu(), b.detach().cpu()) for a, b in zip(ours, theirs)) and all(
        torch.equal(x.cpu(), y.cpu()) for a, b in moments.values() for x, y in zip(a, b))
    return out


def run_case(name: str, args, device, chunk_numel: int, keep_busy: bool) -> dict:
    ours, theirs = make_params(args.mib, device), make_params(args.mib, device)
    opt = HostStateAdamW(ours, chunk_numel=chunk_numel, **HYPER)
    reference = torch.optim.AdamW(theirs, fused=True, **HYPER)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    our_times = timed_steps(opt, ours, 0, args.steps, keep_busy)
    ours_allocated = torch.cuda.memory_allocated(device) - before
    before = torch.cuda.memory_allocated(device)
    their_times = timed_steps(reference, theirs, 0, args.steps, keep_busy)
    theirs_allocated = torch.cuda.memory_allocated(device) - before
    staging = sum(len(st.slots) * 2 * st.capacity * 4 for st in opt._staging.values())  # fp32 slots of both moments
    row = {"case": name, "chunk_numel": chunk_numel, "busy_current_stream": keep_busy,
           "elements": sum(p.numel() for p in ours), "steps": args.steps,
           "host_state_step_s": our_times, "fused_adamw_step_s": their_times,
           "device_bytes_added": {"host_state_adamw": ours_allocated, "fused_adamw": theirs_allocated,
                                  "host_state_staging": staging}}
    row.update(compare(opt, ours, reference, theirs))
    state = opt.state[ours[0]]
    row["moments_on_host_pinned"] = all(state[n].device.type == "cpu" and state[n].is_pinned()
                                        for n in ("exp_avg", "exp_avg_sq"))
    if name == "default_chunks":  # a state_dict round trip, then training on from it
        saved = opt.state_dict()
        resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        resumed = HostStateAdamW(resumed_params, chunk_numel=chunk_numel, **HYPER)
        resumed.load_state_dict(saved)
        s = resumed.state[resumed_params[0]]
        row["loaded_moments_on_host_pinned"] = all(s[n].device.type == "cpu" and s[n].is_pinned()
                                                   for n in ("exp_avg", "exp_avg_sq"))
        timed_steps(resumed, resumed_params, args.steps, 1)
        timed_steps(reference, theirs, args.steps, 1)
        row["resumed"] = compare(resumed, resumed_params, reference, theirs)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mib", type=float, default=400.0, help="MiB of fp32 parameters")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    payload = record_header(1, args.commit)
    if not torch.cuda.is_available():
        payload["error"] = "needs a CUDA device (the CPU path is tested in tests/test_host_optimizer.py)"
        write_json(args.out, payload)
        print(payload["error"], file=sys.stderr)
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    rows = [run_case("default_chunks", args, device, 1 << 24, keep_busy=False),
            run_case("small_chunks", args, device, 1 << 18, keep_busy=False),
            run_case("busy_current_stream", args, device, 1 << 20, keep_busy=True)]
    checks = {}
    for row in rows:
        checks[f"{row['case']}_bit_exact"] = row["bit_exact"]
        checks[f"{row['case']}_moments_pinned_on_host"] = row["moments_on_host_pinned"]
    first = rows[0]
    checks["resumed_bit_exact"] = first["resumed"]["bit_exact"]
    checks["loaded_moments_pinned_on_host"] = first["loaded_moments_on_host_pinned"]
    # both added the gradients; fused AdamW also its moments (8 bytes an element), HostStateAdamW only its slots
    added = first["device_bytes_added"]
    checks["no_moments_on_the_device"] = (added["host_state_adamw"] - added["host_state_staging"]
                                          <= added["fused_adamw"] - 8 * first["elements"])
    elements = first["elements"]
    ours_s = statistics.median(first["host_state_step_s"][1:] or first["host_state_step_s"])
    theirs_s = statistics.median(first["fused_adamw_step_s"][1:] or first["fused_adamw_step_s"])
    timing = {"elements": elements, "host_state_median_step_s": ours_s, "fused_adamw_median_step_s": theirs_s,
              "slowdown": ours_s / theirs_s, "pcie_bytes_each_way": 8 * elements,
              "implied_gb_per_s_each_way": 8 * elements / ours_s / 1e9}
    payload.update(cases=rows, timing=timing, checks=checks, ok=all(checks.values()))
    write_json(args.out, payload)
    for name, ok in checks.items():
        print(("ok    " if ok else "FAIL  ") + name)
    for row in rows:
        print(f"{row['case']}: max abs diff param {row['param_max_abs_diff']:.3e}, exp_avg "
              f"{row['exp_avg_max_abs_diff']:.3e}, exp_avg_sq {row['exp_avg_sq_max_abs_diff']:.3e}")
    print(f"step: HostStateAdamW {ours_s * 1e3:.1f} ms vs fused AdamW {theirs_s * 1e3:.1f} ms for "
          f"{elements / 1e6:.0f}M elements ({timing['implied_gb_per_s_each_way']:.1f} GB/s each way)")
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
