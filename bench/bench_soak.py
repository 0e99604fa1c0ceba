"""Soak: many training steps with every offload on; does memory stay flat once warmed up?

    torchrun --nproc_per_node 1 bench/bench_soak.py --steps 50 --seq_len 262144 --out $OUT/soak.json   # one GPU
    torchrun --nproc_per_node 4 bench/bench_soak.py --steps 2000 --seq_len 512 --hidden 64 --intermediate 128 \\
        --layers 2 --heads 4 --kv_heads 2 --chunk_size 64 --mlp_tile_tokens 64 --loss_tile_tokens 64 \\
        --out soak_cpu.json                                                                    # 4 CPU ranks

A Llama-shaped model (random init) trains under ZeRO-3 with activation checkpointing, kept attention outputs,
FPDT chunks with host offload, checkpoint offload, MLP tiles and the tiled loss (``--offload_optimizer`` also
puts the optimizer in host memory). Recorded at the start of every step: allocated GPU memory (CUDA), the
process's resident memory, and the bytes held by the pinned host pool (FPDT chunks, checkpointed inputs); and
each step's loss. The summary gives, over the steps after ``--warmup``, how far each of them drifts above its
value at the first such step (``(max - first) / first``): a leak shows up as a drift that grows with the steps.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import Memory, record_header, write_json  # noqa: E402


def ds_config(args, world: int) -> dict:
    """ZeRO-3 with every memory feature of the long_context block on (bf16 on GPUs, fp32 on CPU)."""
    U = args.ulysses or world // args.ring
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10 ** 9,
        "long_context": {"ulysses_degree": U, "ring_degree": args.ring, "kernel": args.kernel,
                         "fpdt": {"chunk_size": args.chunk_size, "offload": True},
                         "checkpoint_offload": True, "keep_attention_output": True,
                         "mlp_tile_tokens": args.mlp_tile_tokens, "loss_tile_tokens": args.loss_tile_tokens},
    }
    if torch.cuda.is_available():
        cfg["bf16"] = {"enabled": True}
    if args.offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return cfg


def drift(values) -> float:
    """``(max - first) / first`` of a series (0 for a series that starts at 0 and stays there)."""
    first = values[0]
    if first == 0:
        return 0.0 if max(values) == 0 else math.inf
    return (max(values) - first) / first


def summarize(steps, warmup: int) -> dict:
    """Drift of allocated device memory, resident memory and the host pool after ``warmup`` steps."""
    after = steps[warmup:]
    if not after:
        return {}
    return {"steps_after_warmup": len(after),
            "allocated_drift": drift([r["allocated_at_start_bytes"] for r in after]),
            "rss_drift": drift([r["rss_at_start_bytes"] for r in after]),
            "host_pool_drift": drift([r["host_pool_at_start_bytes"] for r in after]),
            "losses_finite": all(math.isfinite(r["loss"]) for r in steps),
            "seconds_per_step": sum(r["seconds"] for r in after) / len(after)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5, help="steps before the drift is measured")
    ap.add_argument("--seq_len", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--ulysses", type=int, default=0, help="default: all ranks / ring")
    ap.add_argument("--ring", type=int, default=1)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--chunk_size", type=int, default=65536)
    ap.add_argument("--mlp_tile_tokens", type=int, default=16384)
    ap.add_argument("--loss_tile_tokens", type=int, default=4096)
    ap.add_argument("--offload_optimizer", action="store_true", help="ZeRO-3 optimizer states on the CPU")
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import deepspeed
    import psutil
    import transformers

    import ds_longctx
    from ds_longctx.memory import default_pool
    from examples.train import load_corpus, sample_batch, step_generator

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=600))
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
        tie_word_embeddings=False)
    with dev:
        model = transformers.LlamaForCausalLM(config)
    model.gradient_checkpointing_enable()
    engine, _, _, _ = ds_longctx.initialize(model=model, model_parameters=model.parameters(),
                                            config=ds_config(args, world))
    lc = engine.long_context
    corpus = load_corpus(8.0 if cuda else 1.0)
    process = psutil.Process()
    payload = record_header(world, args.commit)
    payload.update(vars(args), ds_config=ds_config(args, world), dp=lc.topology.dp)
    steps = []
    for step in range(args.steps):
        Memory.sync()
        row = {"step": step, "allocated_at_start_bytes": Memory.allocated(),
               "rss_at_start_bytes": process.memory_info().rss,
               "host_pool_at_start_bytes": default_pool().held_bytes}
        t0 = time.perf_counter()
        with lc.during(f"step {step}"):
            b = lc.shard_batch(sample_batch(corpus, 1, args.seq_len, step_generator(0, lc.topology.dp_rank, step)))
            loss = engine(input_ids=b["input_ids"].to(dev), position_ids=b["position_ids"].to(dev),
                          shift_labels=b["shift_labels"].to(dev)).loss
            engine.backward(loss)
            engine.step()
            row["loss"] = loss.item()
        Memory.sync()
        row["seconds"] = time.perf_counter() - t0
        steps.append(row)
        if rank == 0 and (step % max(1, args.steps // 20) == 0 or step == args.steps - 1):
            print(json.dumps(row), flush=True)
    payload["steps"] = steps
    payload["summary"] = summarize(steps, args.warmup)
    # every rank's own drift: a leak on one rank only is still a leak
    gathered = [None] * world
    dist.all_gather_object(gathered, payload["summary"])
    payload["summary_per_rank"] = gathered
    if rank == 0:
        write_json(args.out, payload)
        print("summary:", payload["summary"], flush=True)
    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
