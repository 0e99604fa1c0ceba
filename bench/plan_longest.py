"""The planner's longest trainable sequence per model, with every checkpointed layer keeping its input and with
inputs rebuilt in backward (``checkpoint_every`` free), for a machine given by its facts. Planner only: no GPU.

    python bench/plan_longest.py --models llama3.2-3b,llama3.2-3b:8,llama3.2-3b:4 --gpu-memory-gib 139.8 \\
        --host-memory-gib 124.3 --kernel sdpa_cudnn --out bench/results/plan_longest_h200x1.json --commit X

``MODEL[:LAYERS]``: a bench/models.py preset, optionally a slice of its first layers. Each row records the
length, the chosen ``long_context`` block and the predicted GPU peak, pinned host memory and step time, so a
README number for a length too long to run in a device call comes from a command with its JSON committed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import record_header, write_json  # noqa: E402
from ds_longctx.plan import GIB  # noqa: E402


def longest_row(model_arg: str, gpu_gib: float, host_gib: float, kernel: str, fixed: Optional[Dict]) -> Dict:
    """The longest fitting length of ``model_arg`` (``preset[:layers]``) with ``fixed`` Settings fields."""
    from bench.models import llama_config, resolve_shape
    from ds_longctx.plan import Machine, ModelSpec, Run, Settings
    from ds_longctx.plan.search import longest
    from ds_longctx.plan.verdict import Margins

    preset, _, layers = model_arg.partition(":")
    shape = resolve_shape(preset, layers=int(layers) if layers else None)
    # the transformers config the training bench builds, as `ds-longctx plan --model` reads it
    model = ModelSpec.from_config(llama_config(shape, 4096).to_dict())
    machine = Machine(gpus=1, gpu_memory=int(gpu_gib * GIB), host_memory=int(host_gib * GIB),
                      gpu_name="NVIDIA H200")
    start = time.perf_counter()
    verdict = longest(Run(model=model, world=1, seq_len=1), machine, Margins.default(machine), fixed,
                      base=Settings.recommended(kernel))
    row = {"model": model_arg, "layers": shape.layers, "fixed": fixed or {}, "search_s": time.perf_counter() - start}
    if verdict is None:
        return dict(row, seq_len=None)
    est = verdict.estimate
    return dict(row, seq_len=verdict.run.seq_len, block=verdict.settings.block(model.layers),
                optimizer_offload=verdict.settings.zero.optimizer_offload,
                gpu_peak_gib=est.gpu_peak / GIB, gpu_limit_gib=verdict.gpu_limit / GIB, peak_moment=est.peak_moment,
                host_pinned_gib=est.host_pinned / GIB, host_per_node_gib=verdict.node_host / GIB,
                host_limit_gib=verdict.host_limit / GIB, step_seconds=est.step_seconds,
                gpu_components_gib={k: v / GIB for k, v in est.gpu_components.items()},
                host_components_gib={k: v / GIB for k, v in est.host_components.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="comma-separated MODEL[:LAYERS]")
    ap.add_argument("--gpu-memory-gib", dest="gpu_gib", type=float, required=True)
    ap.add_argument("--host-memory-gib", dest="host_gib", type=float, required=True)
    ap.add_argument("--kernel", default="sdpa_cudnn")
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    payload = record_header(1, args.commit)
    payload["gpus"] = ["CPU (planner only)"]  # the machine modeled is `machine`
    payload.update(machine={"gpus": 1, "gpu_name": "NVIDIA H200", "gpu_memory_gib": args.gpu_gib,
                            "host_memory_gib": args.host_gib}, kernel=args.kernel, rows=[])
    for model_arg in (m for m in args.models.split(",") if m):
        for fixed in ({"checkpoint_every": 1}, None):
            row = longest_row(model_arg, args.gpu_gib, args.host_gib, args.kernel, fixed)
            payload["rows"].append(row)
            print(f"{model_arg:16s} {'every input kept' if fixed else 'inputs rebuilt':18s} {row['seq_len']}",
                  flush=True)
            write_json(args.out, payload)


if __name__ == "__main__":
    main()
