"""Training a Llama-shaped model (random init) with ZeRO-3 and bf16: ds_longctx (hybrid attention, FPDT
offload) against plain DeepSpeed ZeRO-3 (every rank the whole sequence, transformers' SDPA attention).

    deepspeed --num_gpus N bench/bench_train.py --mode ds_longctx --seq_len 262144 --out $OUT/train.json
    deepspeed --num_gpus N bench/bench_train.py --mode deepspeed  --seq_len 262144 --out $OUT/train_ds.json

With ``--checkpointing`` (transformers' gradient checkpointing) ds_longctx keeps the attention outputs
(``--keep_attention_output 1``, the default; 0 recomputes the attention like plain checkpointing), and
``--mlp_tile_tokens`` runs the MLPs over sequence tiles and ``--checkpoint_offload`` keeps each layer's
checkpointed input and kept attention output in pinned host memory until backward. Plain DeepSpeed runs transformers' SDPA attention
with the backend of ``--ds_sdpa`` (cuDNN by default: the fastest SDPA backend on Hopper).

Reports per step: loss, tokens/s, model TFLOP/s per GPU (6 x params x tokens, the input embedding left out,
plus the causal attention's 3.5 x 2 x S^2 x H x D per layer; no recompute counted), and peak GPU memory;
an out-of-memory is a result. The text is the Python standard library's source read as bytes, as in
``examples/train.py``; ``--vocab`` sizes the embedding and LM head (e.g. Llama 3's 128256) for the loss's
memory, and ``--loss_tile_tokens`` has ds_longctx compute the loss from the hidden states tile by tile.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import OOM, Memory, record_header, write_json  # noqa: E402


def ds_config(args, world):
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        # warmup: a random-init model at full learning rate from step 0 makes the per-step losses jump
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-4,
                                                     "warmup_num_steps": 20, "warmup_type": "linear"}},
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        # torch's AdamW: DeepSpeed's fused Adam would have to be compiled on the machine first.
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "stage3_param_persistence_threshold": 100000},
        "steps_per_print": 1000000,
    }
    if args.offload_optimizer:  # fp32 master weights and Adam states in host memory, the step on the CPU
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if args.mode == "ds_longctx":
        U = args.ulysses or world // args.ring
        cfg["long_context"] = {"ulysses_degree": U, "ring_degree": args.ring, "kernel": args.kernel,
                               "fpdt": {"chunk_size": args.chunk_size, "offload": args.offload},
                               "keep_attention_output": bool(args.keep_attention_output),
                               "mlp_tile_tokens": args.mlp_tile_tokens, "loss_tile_tokens": args.loss_tile_tokens,
                               "checkpoint_offload": (True if args.checkpoint_offload < 0
                                                      else args.checkpoint_offload or False),
                               "lean_rms_norm": bool(args.lean_rms_norm)}
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("--mode", choices=["ds_longctx", "deepspeed"], default="ds_longctx")
    ap.add_argument("--seq_len", type=int, default=131072)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--ulysses", type=int, default=0, help="default: all ranks / ring")
    ap.add_argument("--ring", type=int, default=1)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--chunk_size", type=int, default=None)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--checkpointing", action="store_true", help="transformers' gradient checkpointing")
    ap.add_argument("--keep_attention_output", type=int, default=1, choices=[0, 1])
    ap.add_argument("--mlp_tile_tokens", type=int, default=None)
    ap.add_argument("--lean_rms_norm", type=int, default=1, choices=[0, 1],
                    help="ds_longctx: RMSNorms keep only their input for backward (0: the model's own norms)")
    ap.add_argument("--offload_optimizer", action="store_true", help="ZeRO-3 optimizer states on the CPU")
    ap.add_argument("--checkpoint_offload", type=int, nargs="?", const=-1, default=0,
                    help="ds_longctx: the checkpointed layers' inputs and kept outputs wait in pinned host memory "
                         "(alone: every layer; N: the first N layers)")
    ap.add_argument("--tie_embeddings", action="store_true", help="the LM head shares the input embedding")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary (the text is bytes: ids < 256)")
    ap.add_argument("--loss_tile_tokens", type=int, default=None,
                    help="ds_longctx: loss from the model's hidden states over tiles of this many tokens")
    ap.add_argument("--ds_sdpa", default="cudnn", choices=["cudnn", "flash", "efficient", "default"],
                    help="SDPA backend of the plain DeepSpeed run (default: PyTorch's own choice)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
    ap.add_argument("--dist_timeout_s", type=int, default=300, help="collective timeout")
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import deepspeed
    import transformers

    import ds_longctx
    from ds_longctx.memory import default_pool
    from examples.train import load_corpus, sample_batch

    cuda = torch.cuda.is_available()
    # A rank out of memory leaves the others waiting in a collective: the timeout ends the run rather than
    # the device call's limit (its JSON, with the OOM, is already written by then).
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",  # gloo: a CPU smoke run
                               timeout=datetime.timedelta(seconds=args.dist_timeout_s))
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    peak = lambda: Memory.peak() / 2 ** 30  # noqa: E731
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
        rope_theta=500000.0, tie_word_embeddings=args.tie_embeddings, attn_implementation="sdpa")
    with dev:  # built on the device (fast random init), then partitioned by ZeRO-3 at initialize
        model = transformers.LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    # an embedding lookup is no matmul: the FLOP count leaves the input embedding out (the LM head stays in)
    flops_params = n_params - model.get_input_embeddings().weight.numel()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    init = ds_longctx.initialize if args.mode == "ds_longctx" else deepspeed.initialize
    engine, _, _, _ = init(model=model, model_parameters=model.parameters(), config=ds_config(args, world))
    lc = getattr(engine, "long_context", None)
    dp = lc.topology.dp if lc else world

    payload = record_header(world, args.commit)
    payload.update(vars(args), params=n_params, flops_params=flops_params, ds_config=ds_config(args, world), dp=dp)
    if lc is not None:
        from ds_longctx.kernels import get_kernel
        probe = torch.empty(1, 8, args.heads // lc.topology.ulysses, args.hidden // args.heads, device=dev,
                            dtype=torch.bfloat16 if cuda else torch.float32)
        payload["kernel_resolved"] = get_kernel(args.kernel, probe, probe).name
    attn_ctx = contextlib.nullcontext
    if lc is None and cuda and args.ds_sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.ds_sdpa]
        attn_ctx = lambda: sdpa_kernel([backend])  # noqa: E731
    corpus = load_corpus(8.0)
    gen = torch.Generator().manual_seed(lc.topology.dp_rank if lc else rank)
    D = args.hidden // args.heads
    S = args.seq_len
    flops_step = dp * (6 * flops_params * S + 3.5 * 2 * S * S * args.heads * D * args.layers)
    steps = []
    alloc = lambda: Memory.allocated() / 2 ** 30  # noqa: E731
    for step in range(args.steps):
        batch = sample_batch(corpus, 1, S, gen)
        Memory.sync()
        phases = {}
        Memory.reset_peak()  # per-step peaks; the summary takes the largest
        t0 = time.perf_counter()
        try:
            with attn_ctx():
                if lc is not None:
                    b = lc.shard_batch(batch)
                    ids, pos, labels = (b[k].to(dev) for k in ("input_ids", "position_ids", "shift_labels"))
                    if args.loss_tile_tokens:  # the loss from the model, tiled: no logits
                        loss = engine(input_ids=ids, position_ids=pos, shift_labels=labels).loss
                    else:
                        logits = engine(input_ids=ids, position_ids=pos).logits
                        loss = lc.loss(logits, labels)
                        del logits
                else:
                    loss = engine(input_ids=batch["input_ids"].to(dev), labels=batch["labels"].to(dev)).loss
                # where the memory goes: what the forward leaves for backward, and each phase's peak
                phases = {"forward_peak_gib": peak(), "after_forward_gib": alloc()}
                engine.backward(loss)
                phases["backward_peak_gib"] = peak()
            engine.step()
            Memory.sync()
        except OOM as exc:
            payload["oom"] = {"step": step, "error": str(exc).split("\n")[0][:400],
                              "peak_gib": peak()}
            print(f"rank {rank} OOM:", payload["oom"], flush=True)
            break
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": loss.item(), "seconds": dt, "tokens_per_s": S * dp / dt,
               "tflops_per_gpu": flops_step / world / dt / 1e12,
               "peak_gib": peak(), **phases}
        if lc is not None:  # pinned host memory held by the offload pool (FPDT chunks, checkpoints)
            row["host_pool_gib"] = default_pool().held_bytes / 2 ** 30
        if cuda:  # every pinned host allocation of the process (the pool's and DeepSpeed's optimizer offload)
            stats = torch.cuda.host_memory_stats()
            pinned = [v for k, v in stats.items() if "allocated_bytes" in k and k.endswith("current")]
            row["pinned_host_gib"] = max(pinned, default=0) / 2 ** 30
            row["host_memory_stats"] = {k: v for k, v in stats.items() if "bytes" in k}
        steps.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    payload["steps"] = steps
    timed = steps[args.warmup:]
    if timed:
        payload["summary"] = {k: sum(r[k] for r in timed) / len(timed) for k in ("tokens_per_s", "tflops_per_gpu")}
        payload["summary"]["peak_gib"] = max(r["peak_gib"] for r in steps)
    if rank == 0 or "oom" in payload:  # a rank that ran out of memory alone still leaves its record
        write_json(args.out if rank == 0 else f"{args.out}.rank{rank}", payload)
        print("summary:", payload.get("summary"), "oom:", "oom" in payload, flush=True)
    if "oom" not in payload:
        # Leave together: a rank that exits while another still talks to it brings that one down (gloo aborts).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
