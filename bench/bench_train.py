"""Training a Llama-shaped model (random init) with ZeRO-3 and bf16: ds_longctx (hybrid attention, FPDT
offload) against plain DeepSpeed ZeRO-3 (every rank the whole sequence, transformers' SDPA attention).

    deepspeed --num_gpus N bench/bench_train.py --mode ds_longctx --seq_len 262144 --out $OUT/train.json
    deepspeed --num_gpus N bench/bench_train.py --mode deepspeed  --seq_len 262144 --out $OUT/train_ds.json

With ``--checkpointing`` (transformers' gradient checkpointing) ds_longctx keeps the attention outputs
(``--keep_attention_output 1``, the default; 0 recomputes the attention like plain checkpointing), and
``--mlp_tile_tokens`` runs the MLPs over sequence tiles and ``--checkpoint_offload`` keeps each layer's
checkpointed input and kept attention output in pinned host memory until backward. Plain DeepSpeed runs transformers' SDPA attention
with the backend of ``--ds_sdpa`` (cuDNN by default: the fastest SDPA backend on Hopper).

Flags and the DeepSpeed config: ``bench/train_config.py``. Reports per step: loss, tokens/s, model TFLOP/s per GPU (6 x params x tokens, the input embedding left out,
plus the causal attention's 3.5 x 2 x S^2 x H x D per layer; no recompute counted), and peak GPU memory;
an out-of-memory is a result. The text is the Python standard library's source read as bytes, as in
``examples/train.py``; ``--vocab`` sizes the embedding and LM head (e.g. Llama 3's 128256) for the loss's
memory, and ``--loss_tile_tokens`` has ds_longctx compute the loss from the hidden states tile by tile.

``--mode alst`` is DeepSpeed's own long-sequence recipe (ALST, ``bench/alst.py``): gradient checkpointing
with each layer's input in pinned host memory, DeepSpeed's TiledMLP and TiledFusedLogitsLoss, and its
Ulysses attention over more than one rank, with the SDPA backend of ``--ds_sdpa``. ``--model llama3.2-3b`` or
``--model llama3.1-8b`` builds that model's shape (``bench/models.py``; ``--layers`` etc. override a field).
The summary's ``steady_peak_gib`` is the largest GPU peak of the steps after the first (the first optimizer
step allocates the optimizer's state); host memory per step: the offloaded checkpoints' bytes (alst), the
offload pool's (ds_longctx), the pinned memory torch's host allocator holds (CUDA) and the process's RSS.

``--probe_layers K`` makes the run a fit probe (``bench/fit_probe.py``), for lengths where a whole step takes
longer than a device call: after one whole step at ``--warm_seq_len`` tokens (the optimizer's state
allocated; ``"warm_step": true``), the step at ``--seq_len`` stops once K decoder layers have finished their
backward, with no optimizer step, and the run ends. Every decoder layer's backward has the same working set
and the first (the last layer's) also runs the loss's, so the GPU peak so far is the whole step's. Its row has
``probe`` (K, the layers' backwards in the order they finished, with the peak after each and which layers'
parameters got gradients), ``layer_backward_peaks_gib`` (flat from the second on), ``forward_peak_gib``, the
seconds, the host memory; no rates. The record has ``probe_layers`` and ``optimizer_steps`` (the warm-up's);
its summary ``probe_peak_gib`` and the probe's host memory (``probe_host_*``), no tokens/s or TFLOP/s. An
out-of-memory records its ``phase`` (``forward``, ``backward of layer i``, ``warm step``).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import Memory, out_of_memory_kind, record_header, write_json  # noqa: E402
from bench.fit_probe import FitProbe, ProbeStop, decoder_layers, is_warm_step, probe_summary, step_plan  # noqa: E402
from bench.models import llama_config, matmul_params  # noqa: E402
from bench.step_profile import StepProfiler  # noqa: E402
from bench.train_config import ds_config, emulate_machine, parse_args  # noqa: E402,F401


def sdpa_backend(args, cuda):
    """The SDPA backend context of the plain DeepSpeed and ALST runs."""
    if not cuda or args.ds_sdpa == "default" or args.mode == "ds_longctx":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.ds_sdpa]
    return lambda: sdpa_kernel([backend])


def main():
    args, shape = parse_args()

    import deepspeed
    import transformers  # noqa: F401

    import ds_longctx
    from ds_longctx.memory import default_pool
    from examples.train import load_corpus, sample_batch

    from bench import alst

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
    if args.gpu_memory_gib is not None:
        emulate_machine(args, cuda)
    peak = lambda: Memory.peak() / 2 ** 30  # noqa: E731
    torch.manual_seed(0)
    with dev:  # built on the device (fast random init), then partitioned by ZeRO-3 at initialize
        model = transformers.LlamaForCausalLM(llama_config(shape, args.seq_len))
    n_params = sum(p.numel() for p in model.parameters())
    flops_params = matmul_params(model)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    ledger, mpu, alst_info = alst.HostLedger(), None, {}
    if args.mode == "alst":
        alst_info = {"checkpoints_offloaded": alst.offload_checkpoints(model, ledger),
                     "tiled_mlps": alst.tile_mlps(model),
                     "mlp_tiles": -(-(args.seq_len // world) // shape.hidden),
                     "loss_tiles": alst.loss_tiles(args.seq_len // world, shape.vocab, args.alst_loss_tile_gib),
                     "ulysses": world > 1}
        if world == 1:
            alst_info["ulysses_note"] = "one rank holds the whole sequence: UlyssesSPAttentionHF has nothing to do"
        mpu = alst.register_ulysses(model, world, args.seq_len)
    init = ds_longctx.initialize if args.mode == "ds_longctx" else deepspeed.initialize
    try:
        engine, _, _, _ = init(model=model, model_parameters=model.parameters(), config=ds_config(args, world),
                               **({"mpu": mpu} if mpu is not None else {}))
    except ds_longctx.LongContextConfigError as exc:
        if not args.block_seq_len:
            raise
        # the pre-flight check refused the configuration on every rank, before any step: the result
        payload = record_header(world, args.commit)
        payload.update(vars(args), ds_config=ds_config(args, world), preflight_refused=str(exc))
        if rank == 0:
            write_json(args.out, payload)
            print("pre-flight refused:", str(exc)[:2000], flush=True)
        dist.barrier()
        dist.destroy_process_group()
        return
    lc = getattr(engine, "long_context", None)
    if args.mode == "alst":
        alst.tile_loss(engine.module, alst.sequence_group(mpu), args.alst_loss_tile_gib)
    dp = lc.topology.dp if lc else 1 if args.mode == "alst" else world

    payload = record_header(world, args.commit)
    payload.update(vars(args), params=n_params, flops_params=flops_params, ds_config=ds_config(args, world), dp=dp)
    if alst_info:
        payload["alst"] = alst_info
    if lc is not None:
        from ds_longctx.kernels import get_kernel
        probe = torch.empty(1, 8, args.heads // lc.topology.ulysses, args.hidden // args.heads, device=dev,
                            dtype=torch.bfloat16 if cuda else torch.float32)
        payload["kernel_resolved"] = get_kernel(args.kernel, probe, probe).name
    attn_ctx = sdpa_backend(args, cuda)
    corpus = load_corpus(8.0)
    # one sequence per sequence-parallel group: its ranks draw the same one
    gen = torch.Generator().manual_seed(lc.topology.dp_rank if lc else 0 if args.mode == "alst" else rank)
    D = args.hidden // args.heads
    fit = None
    if args.probe_layers:
        # (the record's probe_layers, from the arguments, marks it a fit probe: no step finished, no rates)
        fit = FitProbe(decoder_layers(engine.module), args.probe_layers, peak_gib=peak, sync=Memory.sync)
    steps = []
    profiler = StepProfiler(args.profile_step, trace_path=args.profile_trace)
    alloc = lambda: Memory.allocated() / 2 ** 30  # noqa: E731
    plan = step_plan(seq_len=args.seq_len, steps=args.steps, probe_layers=args.probe_layers,
                     warm_seq_len=args.warm_seq_len, multiple=lc.config.seq_multiple if lc is not None else 1)
    for step, (S, kind) in enumerate(plan):
        flops_step = dp * (6 * flops_params * S + 3.5 * 2 * S * S * args.heads * D * args.layers)
        batch = sample_batch(corpus, 1, S, gen)
        Memory.sync()
        phases = {}
        Memory.reset_peak()  # per-step peaks; the summary takes the largest
        Memory.reset_host_pinned_peak()
        ledger.reset_peak()
        stopped = None
        if kind == "probe":
            fit.arm()
        t0 = time.perf_counter()
        try:
            with attn_ctx(), profiler.context(step):
                if lc is not None:
                    b = lc.shard_batch(batch)
                    ids, pos, labels = (b[k].to(dev) for k in ("input_ids", "position_ids", "shift_labels"))
                    if args.loss_tile_tokens:  # the loss from the model, tiled: no logits
                        loss = engine(input_ids=ids, position_ids=pos, shift_labels=labels).loss
                    else:
                        logits = engine(input_ids=ids, position_ids=pos).logits
                        loss = lc.loss(logits, labels)
                        del logits
                    reported = loss
                elif args.mode == "alst":
                    b = {k: v.to(dev) for k, v in alst.shard_sequence(batch["input_ids"], rank, world).items()}
                    out = engine(**b)
                    loss, reported = out.loss, out.mean_loss
                else:
                    loss = engine(input_ids=batch["input_ids"].to(dev), labels=batch["labels"].to(dev)).loss
                    reported = loss
                if fit is not None:
                    fit.forward_done()
                # where the memory goes: what the forward leaves for backward, and each phase's peak
                phases = {"forward_peak_gib": peak(), "after_forward_gib": alloc()}
                if step == args.profile_step:  # where the profiled step's seconds go, phase by phase
                    Memory.sync()
                    phases["forward_s"] = time.perf_counter() - t0
                try:
                    engine.backward(loss)
                except ProbeStop as stop:
                    stopped = stop
                phases["backward_peak_gib"] = peak()
                if step == args.profile_step:
                    Memory.sync()
                    phases["backward_s"] = time.perf_counter() - t0 - phases["forward_s"]
                if kind == "probe" and stopped is None:  # the hooks never fired: the probe would measure nothing
                    raise RuntimeError("the fit probe's hooks did not stop the backward (no decoder layer input "
                                       "required a gradient?)")
                if stopped is None:  # inside the profiler: the optimizer's step is part of the step's GPU time
                    engine.step()
                Memory.sync()
        except Exception as exc:  # noqa: BLE001 - an out-of-memory is a result, anything else a bug
            kind_oom = out_of_memory_kind(exc)
            if kind_oom is None:
                raise
            payload["oom"] = {"step": step, "kind": kind_oom, "error": str(exc).split("\n")[0][:400],
                              "peak_gib": peak(), "seq_len": S}
            if kind == "warm" or fit is not None:
                payload["oom"]["phase"] = fit.phase() if kind == "probe" else "warm step"
            print(f"rank {rank} OOM:", payload["oom"], flush=True)
            break
        finally:
            if fit is not None:
                fit.disarm()
        dt = time.perf_counter() - t0
        row = {"step": step, "seq_len": S, "loss": reported.item(), "seconds": dt}
        profile = profiler.finish(step, dt)
        if profile is not None:
            row["profile"] = profile
        if kind == "probe":  # a stopped step: no rate, the peaks so far (the step's: see bench/fit_probe.py)
            row["probe"] = fit.record()
            row["layer_backward_peaks_gib"] = [d["peak_gib"] for d in row["probe"]["layer_backwards"]]
        else:
            row.update(tokens_per_s=S * dp / dt, tflops_per_gpu=flops_step / world / dt / 1e12)
            if kind == "warm":
                row["warm_step"] = True
        row.update(peak_gib=peak(), **phases, **host_memory(ledger, default_pool() if lc is not None else None,
                                                            host_moments_bytes(engine)))
        if args.mode == "alst":  # 0: backward gave every copy back (a probe's stopped backward holds the rest)
            row["host_pinned_held_after_step_gib"] = ledger.held / 2 ** 30
        steps.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
            # a run killed later (a device call's end) still leaves the steps it finished
            write_json(args.out, {**payload, "steps": steps, "partial": True})
        # a stopped backward leaves its half-run graph (and ALST's host copies) to the loss: let it go
        loss = reported = out = b = stopped = None  # noqa: F841
    payload["steps"] = steps
    payload["optimizer_steps"] = engine.global_steps  # a probe's step has none: its backward was stopped
    timed = [r for r in steps if not is_warm_step(r)][args.warmup:]  # the warm step is never timed
    if fit is not None:
        fit.remove()
        summary = probe_summary(steps)
        if summary is not None:
            payload["summary"] = summary
    elif timed:
        payload["summary"] = {k: sum(r[k] for r in timed) / len(timed) for k in ("tokens_per_s", "tflops_per_gpu")}
        payload["summary"]["peak_gib"] = max(r["peak_gib"] for r in steps)
        payload["summary"].update(steady_state(steps))
    if rank == 0 or "oom" in payload:  # a rank that ran out of memory alone still leaves its record
        write_json(args.out if rank == 0 else f"{args.out}.rank{rank}", payload)
        print("summary:", payload.get("summary"), "oom:", "oom" in payload, flush=True)
    if "oom" not in payload:
        # Leave together: a rank that exits while another still talks to it brings that one down (gloo aborts).
        dist.barrier()
        dist.destroy_process_group()


def host_moments_bytes(engine) -> int:
    """Bytes of host memory holding HostStateAdamW's moments (``long_context.host_optimizer_states``), page
    rounded as they are locked; 0 for any other optimizer and without CUDA (nothing is locked there)."""
    from ds_longctx.memory.host_optimizer import MOMENTS, HostStateAdamW
    from ds_longctx.memory.pinned import can_register, page_round

    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if not isinstance(basic, HostStateAdamW) or not can_register():
        return 0
    return sum(page_round(state[m].untyped_storage().nbytes()) for state in basic.state.values()
               for m in MOMENTS if m in state)


def host_memory(ledger, pool, moments: int = 0) -> dict:
    """A step's host memory, GiB: the offloaded checkpoints at their most (alst), the offload pool (ds_longctx),
    the pinned memory torch's host allocator held at its most (CUDA; 0 on CPU), the process's resident set.

    The pool page-locks its buffers itself (``cudaHostRegister``), outside torch's host allocator, so the pinned
    total is the allocator's peak (DeepSpeed's optimizer offload, ALST's copies) plus the pool's locked bytes
    (the pool never shrinks within a step: its bytes at the step's end are its peak)."""
    import psutil
    row = {"host_pinned_allocator_gib": Memory.host_pinned_peak() / 2 ** 30,
           "host_rss_gib": psutil.Process().memory_info().rss / 2 ** 30}
    locked = 0
    if pool is not None:  # host memory held by the offload pool (FPDT chunks, checkpoints); locked with CUDA
        row["host_pool_gib"] = pool.held_bytes / 2 ** 30
        locked = pool.locked_bytes
        row["host_pool_locked_gib"] = locked / 2 ** 30
    if moments:  # HostStateAdamW's moments, locked outside the pool and torch's allocator
        row["host_optimizer_moments_gib"] = moments / 2 ** 30
    row["host_pinned_total_gib"] = row["host_pinned_allocator_gib"] + (locked + moments) / 2 ** 30
    if ledger.peak:
        row["host_pinned_gib"] = ledger.peak / 2 ** 30
    return row


def steady_state(steps) -> dict:
    """The steps after the first (whose optimizer step allocates the optimizer state): the largest GPU peak and
    host memory of any of them."""
    later = steps[1:]
    if not later:
        return {}
    out = {"steady_peak_gib": max(r["peak_gib"] for r in later)}
    for k in ("host_pinned_gib", "host_pool_gib", "host_pinned_allocator_gib", "host_pinned_total_gib",
              "host_rss_gib"):
        if k in later[0]:
            out[f"steady_{k}"] = max(r[k] for r in later)
    return out


if __name__ == "__main__":
    main()
