"""``ds-longctx``: command-line checks of a DeepSpeed config's ``long_context`` block.

    ds-longctx validate ds_config.json [--world-size N] [--heads H [--kv-heads K]] [--seq-len S]

prints what is wrong and exits 1, or prints the resolved block (every default filled in) and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


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
    out = {BLOCK_KEY: resolved_block(cfg)}
    if BLOCK_KEY not in ds:
        print(f"note: {args.config} has no {BLOCK_KEY} block; these are the defaults (no sequence parallelism)",
              file=sys.stderr)
    else:
        from .integration.deepspeed_hook import how_the_block_is_read

        print(how_the_block_is_read(), file=sys.stderr)
    print(json.dumps(out, indent=2))
    if args.world_size is not None:
        print(f"world {args.world_size} = data-parallel {args.world_size // cfg.sp_degree} x ring "
              f"{cfg.ring_degree} x ulysses {cfg.ulysses_degree}; sequence lengths must be multiples of "
              f"{cfg.seq_multiple}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-longctx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check the long_context block of a DeepSpeed config",
                       description="Check the long_context block of a DeepSpeed config; print the problems "
                                   "(exit 1) or the resolved block (exit 0).")
    v.add_argument("config", help="DeepSpeed config file (json or hjson)")
    v.add_argument("--world-size", type=int, help="number of ranks the job will run on")
    v.add_argument("--heads", type=int, help="the model's query heads (num_attention_heads)")
    v.add_argument("--kv-heads", type=int, help="the model's key/value heads (num_key_value_heads)")
    v.add_argument("--seq-len", type=int, help="global sequence length of the batches")
    v.set_defaults(func=_validate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``ds-longctx`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
