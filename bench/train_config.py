"""The training bench's command line and the DeepSpeed config it builds (``bench/bench_train.py``): the
model shape, the mode (ds_longctx, plain ZeRO-3, ALST) and its settings, and a smaller machine emulated
on a larger GPU (``--gpu_memory_gib`` / ``--host_memory_gib``)."""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench.models import PRESETS, SHAPE_FLAGS, resolve_shape


def keep_attention_output(flag: str):
    """The block's ``keep_attention_output`` of ``--keep_attention_output`` ("0", "1" or "reruns")."""
    return flag if flag == "reruns" else bool(int(flag))


def ds_config(args, world):
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": args.dtype == "bfloat16"},  # float32: the CPU runs that compare modes exactly
        # torch's AdamW: DeepSpeed's fused Adam would have to be compiled on the machine first. SGD is for exact
        # comparisons of modes: its update is linear in the gradient, where Adam's first update is sign(gradient).
        "optimizer": ({"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                   "torch_adam": True}} if args.optimizer == "adamw" else
                      {"type": "SGD", "params": {"lr": args.lr, "momentum": 0.9}}),
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "stage3_param_persistence_threshold": 100000},
        "steps_per_print": 1000000,
        "zero_allow_untested_optimizer": args.optimizer == "sgd",
    }
    if args.lr_warmup_steps:  # a random-init model at full learning rate from step 0 makes the losses jump
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr,
                                                          "warmup_num_steps": args.lr_warmup_steps,
                                                          "warmup_type": "linear"}}
    if args.offload_optimizer:  # fp32 master weights and Adam states in host memory, the step on the CPU
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if args.mode == "ds_longctx":
        U = args.ulysses or world // args.ring
        cfg["long_context"] = {"ulysses_degree": U, "ring_degree": args.ring, "kernel": args.kernel,
                               "fpdt": {"chunk_size": args.chunk_size, "offload": args.offload},
                               "keep_attention_output": keep_attention_output(args.keep_attention_output),
                               "mlp_tile_tokens": args.mlp_tile_tokens, "loss_tile_tokens": args.loss_tile_tokens,
                               "checkpoint_offload": (True if args.checkpoint_offload < 0
                                                      else args.checkpoint_offload or False),
                               "checkpoint_layers": args.checkpoint_layers,
                               "checkpoint_every": args.checkpoint_every,
                               "lean_rms_norm": bool(args.lean_rms_norm),
                               "host_optimizer_states": bool(args.host_optimizer_states)}
        if args.fused_norms:  # not a planned setting: in the block only when asked for
            cfg["long_context"]["fused_norms"] = True
        if args.fused_gated_mlp:
            cfg["long_context"]["fused_gated_mlp"] = True
        if args.fused_rope:
            cfg["long_context"]["fused_rope"] = True
        if args.block_seq_len:  # the pre-flight check of initialize runs for this length
            cfg["long_context"]["seq_len"] = args.seq_len
    return cfg


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("--mode", choices=["ds_longctx", "deepspeed", "alst"], default="ds_longctx")
    ap.add_argument("--label", default=None, help="the run's name in plots and tables (default: the mode)")
    ap.add_argument("--seq_len", type=int, default=131072)
    ap.add_argument("--model", choices=sorted(PRESETS), default=None,
                    help="a real model's shape at full depth (the shape flags below override its fields)")
    for flag in SHAPE_FLAGS:  # default: the preset's value, or bench.models.DEFAULT_SHAPE's
        ap.add_argument(f"--{flag}", type=int, default=None, **({"choices": [0, 1]} if flag.startswith("tie") else {}))
    ap.add_argument("--ulysses", type=int, default=0, help="default: all ranks / ring")
    ap.add_argument("--ring", type=int, default=1)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--chunk_size", type=int, default=None)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--checkpointing", action="store_true", help="transformers' gradient checkpointing")
    ap.add_argument("--keep_attention_output", default="1", choices=["0", "1", "reruns"],
                    help="1: every checkpointed layer's attention output kept; 0: none; reruns: those reruns take "
                         "(with --checkpoint_every)")
    ap.add_argument("--mlp_tile_tokens", type=int, default=None)
    ap.add_argument("--lean_rms_norm", type=int, default=1, choices=[0, 1],
                    help="ds_longctx: RMSNorms keep only their input for backward (0: the model's own norms)")
    ap.add_argument("--fused_norms", action="store_true",
                    help="ds_longctx: the lean norms' tiles as compiled kernels (long_context.fused_norms)")
    ap.add_argument("--fused_gated_mlp", action="store_true",
                    help="ds_longctx: the MLP's silu(gate) * up as compiled kernels (long_context.fused_gated_mlp)")
    ap.add_argument("--fused_rope", action="store_true",
                    help="ds_longctx: the rotary embedding of q and k as compiled kernels (long_context.fused_rope)")
    ap.add_argument("--offload_optimizer", action="store_true", help="ZeRO-3 optimizer states on the CPU")
    ap.add_argument("--host_optimizer_states", action="store_true",
                    help="ds_longctx: AdamW's moments in pinned host memory, streamed through the GPU for the update "
                         "(long_context.host_optimizer_states)")
    ap.add_argument("--checkpoint_layers", type=int, default=None,
                    help="ds_longctx with --checkpointing: only the first N decoder layers checkpointed, the rest "
                         "keep their activations (default: every layer)")
    ap.add_argument("--checkpoint_every", type=int, default=1,
                    help="ds_longctx with --checkpointing: only every N-th checkpointed layer keeps its input, the "
                         "others rebuild it in backward (long_context.checkpoint_every)")
    ap.add_argument("--checkpoint_offload", type=int, nargs="?", const=-1, default=0,
                    help="ds_longctx: the checkpointed layers' inputs and kept outputs wait in pinned host memory "
                         "(alone: every layer; N: the first N layers)")
    ap.add_argument("--loss_tile_tokens", type=int, default=None,
                    help="ds_longctx: loss from the model's hidden states over tiles of this many tokens")
    ap.add_argument("--alst_loss_tile_gib", type=float, default=1.0,
                    help="alst: GiB of fp32 logits per TiledFusedLogitsLoss tile (ArcticTraining's 1)")
    ap.add_argument("--ds_sdpa", default="cudnn", choices=["cudnn", "flash", "efficient", "default"],
                    help="SDPA backend of the plain DeepSpeed and ALST runs (default: PyTorch's own choice)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    ap.add_argument("--lr_warmup_steps", type=int, default=20,
                    help="linear warmup of the learning rate (DeepSpeed's WarmupLR; 0: constant from step 0)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
    ap.add_argument("--block_seq_len", type=int, default=0, choices=[0, 1],
                    help="1: --seq_len in the long_context block, so initialize's pre-flight check runs for it; "
                         "a refusal is recorded (preflight_refused) and the run ends")
    ap.add_argument("--gpu_memory_gib", type=float, default=None,
                    help="a smaller GPU: the caching allocator may hold no more than this (the rest of the GPU "
                         "is out of reach), and initialize's plan is told so")
    ap.add_argument("--host_memory_gib", type=float, default=None,
                    help="with --gpu_memory_gib: the host memory initialize's plan is told the process may use")
    ap.add_argument("--profile_step", type=int, default=-1,
                    help="run this step under torch.profiler: its row gets 'profile' (bench/step_profile.py: GPU busy "
                         "and idle seconds, time per kernel class, exposed host copies, the top kernels)")
    ap.add_argument("--profile_trace", default=None,
                    help="with --profile_step: also write the step's trace there (Chrome trace format, gzipped, "
                         "with Python stacks: which code launched each kernel, what the host did while the GPU "
                         "idled)")
    ap.add_argument("--probe_layers", type=int, default=0,
                    help="a fit probe (bench/fit_probe.py): the step at --seq_len stops after this many decoder "
                         "layers' backward (counted from the last; its peak so far is the step's peak), no "
                         "optimizer step; the run ends after it (--steps 1). 0: off")
    ap.add_argument("--warm_seq_len", "--probe_warm_seq_len", dest="warm_seq_len", type=int, default=0,
                    help="one whole training step at this length first, left out of the rates and of --warmup: "
                         "the optimizer's state exists from the first step at --seq_len on, so a single step there "
                         "is a steady one (its GPU peak included), and a fit probe meets the state it would "
                         "(ds_longctx: rounded up to the block's sequence multiple, e.g. the FPDT chunk). 0: none")
    ap.add_argument("--dist_timeout_s", type=int, default=300, help="collective timeout")
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    shape = resolve_shape(args.model, **{k: getattr(args, k) for k in SHAPE_FLAGS})
    for k in SHAPE_FLAGS:  # the JSON records the shape that ran
        setattr(args, k, getattr(shape, k))
    args.label = args.label or args.mode
    if args.host_optimizer_states and (args.mode != "ds_longctx" or args.optimizer != "adamw"
                                       or args.offload_optimizer):
        ap.error("--host_optimizer_states is ds_longctx's AdamW: --mode ds_longctx --optimizer adamw, without "
                 "--offload_optimizer")
    if args.mode == "alst" and not args.checkpointing:
        ap.error("--mode alst is gradient checkpointing with the checkpoints in host memory: add --checkpointing")
    if args.probe_layers:
        if not 1 <= args.probe_layers <= args.layers:
            ap.error(f"--probe_layers {args.probe_layers}: between 1 and the model's {args.layers} layers")
        if args.steps != 1:
            ap.error("--probe_layers: a probe step stops its backward half-way and ends the run; pass --steps 1 "
                     "(a warm-up step at another length: --warm_seq_len)")
    return args, shape


def emulate_machine(args, cuda) -> None:
    """Run as on a GPU of ``--gpu_memory_gib`` and a host of ``--host_memory_gib``: the caching allocator is
    capped (an allocation past the cap raises out-of-memory, as on the smaller GPU), and initialize's plan
    reads both facts from ``DS_LONGCTX_MACHINE``."""
    from ds_longctx.plan.machine import GIB, MACHINE_ENV

    if args.host_memory_gib is None:
        raise SystemExit("--gpu_memory_gib needs --host_memory_gib (the host the plan may use)")
    name = "NVIDIA H200"
    if cuda:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if args.gpu_memory_gib * GIB > total:
            raise SystemExit(f"--gpu_memory_gib {args.gpu_memory_gib} is more than this GPU has "
                             f"({total / GIB:.1f} GiB)")
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_gib * GIB / total)
        name = torch.cuda.get_device_name()
    os.environ[MACHINE_ENV] = json.dumps({"gpu_memory_gib": args.gpu_memory_gib,
                                          "host_memory_gib": args.host_memory_gib, "gpu_name": name})
