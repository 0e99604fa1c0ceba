"""Train a small Llama-style model on long sequences with hybrid Ulysses x ring attention and ZeRO-3.

    deepspeed --num_gpus 2 examples/train.py --deepspeed_config ds_config_templates/cpu_smoke.json
    deepspeed --num_gpus 8 examples/train.py --deepspeed_config ds_config_templates/hybrid.json --seq_len 65536
    ... --save_dir ckpt --save_every 100 --metrics metrics.jsonl   # run the same command again to resume

An ordinary DeepSpeed training script: the only changes for long context are ``ds_longctx.initialize`` in
place of ``deepspeed.initialize`` and sharding each batch with ``engine.long_context.shard_batch`` (and the
matching loss). Everything is embedded: the model is built from a transformers config (no download), and
the text is the Python standard library's own source code, read byte by byte (a 256-token vocabulary).
Precision and ZeRO stage come from the DeepSpeed config: the GPU templates train in bf16 with ZeRO-3.
"""
from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time

import deepspeed
import torch
import transformers
from tqdm import tqdm

import ds_longctx
from ds_longctx.integration.checkpoints import load_newest_complete, save_complete


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", "-1")),
                   help="set by the deepspeed launcher")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq_len", type=int, default=4096, help="global tokens per sequence (split over ranks)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--corpus_mb", type=float, default=8.0, help="MB of stdlib source to train on")
    p.add_argument("--log_every", type=int, default=50, help="also print a log line every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_dir", default=None,
                   help="save a checkpoint here every --save_every steps, and resume from the newest complete one "
                        "found here (the same command continues a killed run)")
    p.add_argument("--save_every", type=int, default=100)
    p.add_argument("--metrics", default=None, help="append one JSON line per step: step, loss, tokens_per_s")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing of the decoder layers (the attention outputs are kept unless "
                        "the config's long_context.keep_attention_output is false)")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args()
    if args.deepspeed_config is None:
        args.deepspeed_config = os.path.join(os.path.dirname(__file__), "..", "ds_config_templates",
                                             "cpu_smoke.json")
    return args


def load_corpus(megabytes: float) -> torch.Tensor:
    """Bytes of the standard library's .py files (sorted, so every rank reads the same text). ``[N]`` uint8."""
    root = sysconfig.get_paths()["stdlib"]
    budget = int(megabytes * 2 ** 20)
    chunks, size = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "test", "tests"))
        for name in sorted(filenames):
            if name.endswith(".py") and size < budget:
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
                chunks.append(data)
                size += len(data)
    text = b"\n".join(chunks)[:budget]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).clone()


def step_generator(seed: int, dp_rank: int, step: int) -> torch.Generator:
    """The data of a step is a function of the step: resuming at a step draws the batches it would have."""
    return torch.Generator().manual_seed((seed * 1_000_003 + dp_rank) * 1_000_003 + step)


def sample_batch(corpus: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> dict:
    """Random windows of the corpus: ``input_ids`` and ``labels`` ``[B, S]`` (labels shifted later)."""
    starts = torch.randint(0, corpus.numel() - seq_len, (batch_size,), generator=generator)
    ids = torch.stack([corpus[s:s + seq_len] for s in starts.tolist()]).long()
    return {"input_ids": ids, "labels": ids.clone()}


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 30
    except ImportError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    if args.checkpointing:
        model.gradient_checkpointing_enable()

    # The one changed call: ds_longctx.initialize takes deepspeed.initialize's arguments.
    engine, _, _, _ = ds_longctx.initialize(args=args, model=model, model_parameters=model.parameters())
    lc = engine.long_context
    topo = lc.topology

    corpus = load_corpus(args.corpus_mb)
    split = int(corpus.numel() * 0.95)
    train, held_out = corpus[:split], corpus[split:]
    micro = engine.train_micro_batch_size_per_gpu()
    tokens_per_step = micro * args.seq_len * topo.dp * engine.gradient_accumulation_steps()

    is_main = topo.rank == 0
    if is_main:
        print(f"model {n_params / 1e6:.2f}M params, {topo.world_size} ranks = dp {topo.dp} x ring {topo.ring} "
              f"x ulysses {topo.ulysses}, seq_len {args.seq_len} ({args.seq_len // topo.sp} tokens per rank), "
              f"corpus {corpus.numel() / 2 ** 20:.1f} MB of stdlib source, device {engine.device}", flush=True)
        if args.checkpointing:
            kept = "kept" if lc.config.keep_attention_output else "recomputed"
            print(f"activation checkpointing on, attention outputs {kept}", flush=True)

    first_step = 0
    if args.save_dir:
        resumed = load_newest_complete(engine, args.save_dir)
        if resumed is not None:
            first_step = resumed.client_state["step"]  # the data position: the next batches are step's + 1
            if is_main:
                print(f"resumed from {resumed.path} after step {first_step}", flush=True)
    metrics = open(args.metrics, "a") if args.metrics and is_main else None

    first_loss = last_loss = None
    start = time.perf_counter()
    bar = tqdm(range(first_step, args.steps), disable=not is_main, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        # Every rank of a sequence-parallel group draws the same batch; data-parallel replicas differ.
        gen = step_generator(args.seed, topo.dp_rank, step)
        with lc.during(f"step {step + 1}"):  # a rank that fails or hangs is named on the other ranks
            for _ in range(engine.gradient_accumulation_steps()):
                # The other change: shard the batch (labels shifted first) and take the group's loss.
                batch = lc.shard_batch(sample_batch(train, micro, args.seq_len, gen))
                logits = engine(input_ids=batch["input_ids"].to(engine.device),
                                position_ids=batch["position_ids"].to(engine.device)).logits
                loss = lc.loss(logits, batch["shift_labels"].to(engine.device))
                engine.backward(loss)
                engine.step()
            last_loss = loss.item()
        dt = time.perf_counter() - t0
        first_loss = last_loss if first_loss is None else first_loss
        mem = memory_gb(engine.device)
        bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", mem=f"{mem:.2f}GB")
        if is_main and args.log_every and (step + 1) % args.log_every == 0:
            tqdm.write(f"step {step + 1:5d}  loss {last_loss:.4f}  {tokens_per_step / dt:,.0f} tok/s  "
                       f"mem {mem:.2f} GB")
        if metrics is not None:
            metrics.write(json.dumps({"step": step + 1, "loss": last_loss,
                                      "tokens_per_s": tokens_per_step / dt}) + "\n")
            metrics.flush()
        if args.save_dir and (step + 1) % args.save_every == 0:
            with lc.during(f"saving the checkpoint of step {step + 1}"):
                save_complete(engine, args.save_dir, step + 1)
    elapsed = time.perf_counter() - start

    engine.eval()
    eval_gen = torch.Generator().manual_seed(12345)
    eval_losses = []
    with torch.no_grad():
        for _ in range(4):
            batch = lc.shard_batch(sample_batch(held_out, micro, args.seq_len, eval_gen))
            logits = engine(input_ids=batch["input_ids"].to(engine.device),
                            position_ids=batch["position_ids"].to(engine.device)).logits
            eval_losses.append(lc.loss(logits, batch["shift_labels"].to(engine.device)).item())
    if is_main and last_loss is not None:
        steps = args.steps - first_step
        print(f"done: {steps} steps in {elapsed:.1f}s, {tokens_per_step * steps / elapsed:,.0f} tok/s, "
              f"loss {first_loss:.4f} -> {last_loss:.4f}, held-out loss {sum(eval_losses) / len(eval_losses):.4f} "
              f"(uniform over bytes: {torch.log(torch.tensor(256.0)).item():.4f}), "
              f"peak memory {memory_gb(engine.device):.2f} GB", flush=True)
    if metrics is not None:
        metrics.close()
    # A clean shutdown: process groups left to interpreter teardown can abort a rank's exit.
    engine.destroy()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
