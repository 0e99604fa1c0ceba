"""``ds-longctx``: command-line checks of a DeepSpeed config's ``long_context`` block, and plans.

    ds-longctx validate ds_config.json [--world-size N] [--heads H [--kv-heads K]] [--seq-len S] [--model CONFIG]
    ds-longctx plan --model CONFIG_JSON --seq-len S|max [--gpus N] [--gpu-memory-gib G] [--host-memory-gib H]
                    [--ds-config DS_JSON] [--micro-batch B] [--no-checkpointing] [--json]

``validate`` prints what is wrong and exits 1, or prints the resolved block (every default filled in) and
exits 0; with ``--model`` and ``--seq-len`` it also predicts the step's memory on this machine (pre-flight).
``plan`` predicts GPU peak, pinned host memory and step time, chooses the fastest configuration that fits
(or evaluates ``--ds-config``), and with ``--seq-len max`` finds the longest sequence that fits; exit 1 when
nothing fits.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _machine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, help="GPUs of the job (default: the GPUs pynvml sees)")
    parser.add_argument("--gpu-memory-gib", type=float, help="memory of each GPU (default: GPU 0's, from pynvml)")
    parser.add_argument("--host-memory-gib", type=float,
                        help="host memory per node the job may use (default: the cgroup limit, else MemAvailable)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: min(gpus, 8))")


def _validate(args: argparse.Namespace) -> int:
    from .config import BLOCK_KEY, LongContextConfig, LongContextConfigError, load_ds_config, resolved_block

    problems: List[str] = []
    try:
        ds = load_ds_config(args.config)
        cfg = LongContextConfig.from_block(ds.get(BLOCK_KEY))
    except LongContextConfigError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    checks = [lambda: cfg.check_ds_config(ds)]
    if args.world_size is not None:
        checks.append(lambda: cfg.check_world(args.world_size))
    if args.heads is not None:
        checks.append(lambda: cfg.check_heads(args.heads, args.kv_heads))
    if args.seq_len is not None:
        checks.append(lambda: cfg.check_seq_len(args.seq_len))
    for check in checks:
        try:
            check()
        except LongContextConfigError as exc:
            problems.append(str(exc))
    if problems:
        print(f"{args.config}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    if args.model is not None and args.seq_len is not None and not problems:
        problem = _preflight(args, cfg, ds)
        if problem:
            print(f"{args.config}: {problem}", file=sys.stderr)
            return 1
    out = {BLOCK_KEY: resolved_block(cfg)}
    if BLOCK_KEY not in ds:
        print(f"note: {args.config} has no {BLOCK_KEY} block; these are the defaults (no sequence parallelism)",
              file=sys.stderr)
    else:
        from .integration.deepspeed_hook import how_the_block_is_read

        print(how_the_block_is_read(), file=sys.stderr)
    if cfg.auto_fields:
        when = (f"for {BLOCK_KEY}.seq_len = {cfg.seq_len}" if cfg.seq_len else
                f"from {BLOCK_KEY}.seq_len, the training_data's first sample or, without either, the first batch "
                f"through engine.long_context.shard_batch (of one length on every rank)")
        print(f"note: {', '.join(cfg.auto_fields)} are \"auto\": ds_longctx.initialize resolves them for a "
              f"transformers model on the machine {when}; ds-longctx plan suggests values", file=sys.stderr)
    print(json.dumps(out, indent=2))
    if args.world_size is not None:
        print(f"world {args.world_size} = data-parallel {args.world_size // cfg.sp_degree} x ring "
              f"{cfg.ring_degree} x ulysses {cfg.ulysses_degree}; sequence lengths must be multiples of "
              f"{cfg.seq_multiple}", file=sys.stderr)
    return 0


def _machine(args):
    from .plan.machine import detect
    return detect(gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib, host_memory_gib=args.host_memory_gib,
                  gpus_per_node=args.gpus_per_node)


def _preflight(args, cfg, ds) -> str:
    """The pre-flight check of ``validate --model --seq-len`` (empty when the step fits)."""
    from .plan import MachineError, ModelSpec, ModelSpecError, Run
    from .plan.preflight import PlanError, check, resolve
    from .plan.verdict import Margins
    from .plan.settings import Settings, ZeroSettings
    try:
        model = ModelSpec.from_path(args.model)
        machine = _machine(args)
        run = Run(model=model, world=args.world_size or machine.gpus, seq_len=args.seq_len)
        zero = ZeroSettings.from_ds_config(ds)
        margins = Margins.default(machine)
        check(resolve(cfg, run, machine, margins, zero), run, machine, margins, zero)
    except (PlanError, MachineError, ModelSpecError) as exc:
        return str(exc)
    return ""


def _plan(args: argparse.Namespace) -> int:
    from .config import BLOCK_KEY, LongContextConfig, LongContextConfigError, load_ds_config
    from .plan import MachineError, ModelSpec, ModelSpecError, Run
    from .plan.preflight import PlanError, fixed_fields, resolve, settings_of
    from .plan.report import plan_record, table
    from .plan.search import best, longest
    from .plan.verdict import Margins, judge
    from .plan.settings import Settings, ZeroSettings

    try:
        model = ModelSpec.from_path(args.model)
        machine = _machine(args)
        ds = load_ds_config(args.ds_config) if args.ds_config else _default_ds_config(args.micro_batch)
        cfg = LongContextConfig.from_block(ds.get(BLOCK_KEY)) if args.ds_config else None
    except (MachineError, ModelSpecError, LongContextConfigError) as exc:
        print(f"ds-longctx plan: {exc}", file=sys.stderr)
        return 2
    micro_batch = args.micro_batch or int(ds.get("train_micro_batch_size_per_gpu", 1) or 1)
    margins = Margins.default(machine, args.gpu_margin_gib, args.host_margin_gib)
    zero = ZeroSettings.from_ds_config(ds)
    seq_len = None if args.seq_len == "max" else _positive(args.seq_len)
    if args.seq_len != "max" and seq_len is None:
        print(f"ds-longctx plan: --seq-len must be a positive number of tokens or max, got {args.seq_len!r}",
              file=sys.stderr)
        return 2
    run = Run(model=model, world=machine.gpus, seq_len=seq_len or 1, micro_batch=micro_batch,
              checkpointing=not args.no_checkpointing)
    # with --ds-config: its values are fixed, its "auto" values chosen
    fixed = fixed_fields(cfg, model.layers, zero) if cfg is not None else None
    reason = None
    if seq_len is None:
        verdict = longest(run, machine, margins, fixed, base=Settings.recommended(args.kernel))
        if verdict is None:
            print(f"ds-longctx plan: not even {run.with_seq_len(32768).seq_len} tokens fit {model.name} on "
                  f"{machine.gpus} GPU(s); use more GPUs or offload the optimizer", file=sys.stderr)
            return 1
        run = verdict.run
    else:
        try:
            if cfg is not None:
                cfg.check_world(run.world)
                cfg.check_layers(model.layers)
                resolved = resolve(cfg, run, machine, margins, zero)
                verdict = judge(run, settings_of(resolved, model.layers, zero), machine, margins)
                if not verdict.fits:
                    winner, _ = best(run, machine, margins, None, base=Settings.recommended(args.kernel))
                    reason = (f"does not fit: {verdict.why_not()}; " + (
                        f"fastest that fits: {winner.settings.block(model.layers)}" if winner else
                        "no configuration fits on these GPUs"))
            else:
                winner, smallest = best(run, machine, margins, None, base=Settings.recommended(args.kernel))
                verdict = winner or smallest
                if winner is None:
                    reason = (f"nothing fits; the smallest GPU peak does not fit either: {smallest.why_not()}; "
                              f"use more GPUs or a shorter sequence (--seq-len max finds the longest)"
                              if smallest else "the sequence length cannot be split over these GPUs")
        except (PlanError, LongContextConfigError) as exc:
            print(f"ds-longctx plan: {exc}", file=sys.stderr)
            return 1
        if verdict is None:
            print(f"ds-longctx plan: {reason}", file=sys.stderr)
            return 1
    record = plan_record(run, machine, verdict, ds, reason)
    print(json.dumps(record, indent=2) if args.json else table(record))
    if not record["fits"]:
        if not args.json:
            print(f"does not fit: {reason or verdict.why_not()}", file=sys.stderr)
        return 1
    return 0


def _positive(text: str):
    try:
        value = int(text)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def _default_ds_config(micro_batch) -> dict:
    """The DeepSpeed config a plan without --ds-config fills in: ZeRO-3, bf16, AdamW."""
    return {"train_micro_batch_size_per_gpu": micro_batch or 1, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True}, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "weight_decay": 0.1}},
            "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-longctx", description=__doc__.split("\n\n")[0])
    from .config import KERNEL_NAMES
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check the long_context block of a DeepSpeed config",
                       description="Check the long_context block of a DeepSpeed config; print the problems "
                                   "(exit 1) or the resolved block (exit 0).")
    v.add_argument("config", help="DeepSpeed config file (json or hjson)")
    v.add_argument("--world-size", type=int, help="number of ranks the job will run on")
    v.add_argument("--heads", type=int, help="the model's query heads (num_attention_heads)")
    v.add_argument("--kv-heads", type=int, help="the model's key/value heads (num_key_value_heads)")
    v.add_argument("--seq-len", type=int, help="global sequence length of the batches")
    v.add_argument("--model", help="with --seq-len: the model's config.json (or its folder), to predict the "
                                   "step's memory on this machine (pre-flight)")
    _machine_flags(v)
    v.set_defaults(func=_validate)
    p = sub.add_parser("plan", help="predict memory and time; choose the fastest configuration that fits",
                       description="Predict one training step's GPU peak, pinned host memory and time under "
                                   "ds_longctx and ZeRO-3 (bf16); choose the fastest configuration that fits "
                                   "this machine (or evaluate --ds-config); --seq-len max: the longest sequence.")
    p.add_argument("--model", required=True, help="a transformers config.json, or a folder holding one")
    p.add_argument("--seq-len", required=True, help="global tokens per sequence, or max")
    p.add_argument("--ds-config", help="evaluate this DeepSpeed config (its long_context block) instead of choosing")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU and step (default: the config's, else 1)")
    p.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off")
    p.add_argument("--kernel", default="auto", choices=KERNEL_NAMES,
                   help="the attention kernel the run will use (default auto: FlashAttention-4 on Hopper); the "
                        "step time is predicted at its rate")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--gpu-margin-gib", type=float, help="GPU memory kept free (default: 10%% of it)")
    p.add_argument("--host-margin-gib", type=float, help="host memory kept free (default: 10%% of it)")
    _machine_flags(p)
    p.set_defaults(func=_plan)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``ds-longctx`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
