"""Training jobs for the DeepSpeed integration tests (module-level so that gloo workers can run them by name).

``train_with_deepspeed`` runs on every rank of a world: a tiny causal LM (transformers Llama, Qwen2, Qwen3,
Mistral, or a plain torch module), ZeRO (stage 3 unless asked), the ``long_context`` block of the case, a
few optimizer steps. ``train_single_process`` trains the same model on the same data in one plain PyTorch
process, without DeepSpeed or sequence parallelism, on the model's own attention: the reference.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Union

import torch

VOCAB = 96
HIDDEN, LAYERS = 64, 2
# SGD with momentum for the exact comparisons: its update is linear in the gradient, so a wrong gradient
# scale (e.g. summing instead of averaging over sequence ranks) shows as a wrong update, and fp32 rounding
# stays at its own size. AdamW normalizes every element by its own history: it hides a global scale error
# and turns the rounding of near-zero gradient elements into relative update errors above 1e-5.
OPTIMIZERS = {
    "sgd": {"type": "SGD", "params": {"lr": 0.3, "momentum": 0.9, "weight_decay": 0.01}},
    "adamw": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                          "torch_adam": True}},
}


def _torch_optimizer(name: str, params):
    p = dict(OPTIMIZERS[name]["params"])
    if name == "sgd":
        return torch.optim.SGD(params, **p)
    p.pop("torch_adam")
    return torch.optim.AdamW(params, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                             weight_decay=p["weight_decay"])


class TinyAttention(torch.nn.Module):
    """Plain torch GQA attention: ds_longctx's distributed attention once set up, else local sdpa."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, heads * self.head_dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = torch.nn.Linear(heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ds_longctx.integration.context import long_context_of

        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.heads, self.head_dim)
        k, v = self.kv(x).view(B, S, 2, self.kv_heads, self.head_dim).unbind(2)
        lc = long_context_of(self, required=False)
        if lc is not None:
            out = lc.attention(q, k, v)  # [B, S_local, H, D], exact over the group's whole sequence
        else:
            rep = self.heads // self.kv_heads
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                v.repeat_interleave(rep, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
        return self.o(out.reshape(B, S, -1))


class TinyTorchLM(torch.nn.Module):
    """A causal LM written in plain torch (no transformers): learned absolute position embeddings read at
    ``position_ids`` (global positions in the zigzag layout), one pre-norm attention + MLP block."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, kv_heads: int = 2, max_len: int = 256):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(max_len, dim)
        self.norm1, self.norm2, self.norm3 = (torch.nn.LayerNorm(dim) for _ in range(3))
        self.attn = TinyAttention(dim, heads, kv_heads)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(input_ids) + self.pos(position_ids)
        h = h + self.attn(self.norm1(h))
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm3(h))


def build_model(kind: str, seq_len: int, seed: int = 0, layers: int = LAYERS):
    """A tiny fp32 causal LM of family ``kind`` with ``layers`` decoder layers built from a config (no download),
    seeded."""
    if kind == "plain":
        torch.manual_seed(seed)
        return TinyTorchLM(max_len=max(seq_len, 256))
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(seq_len, 256),
                  tie_word_embeddings=False, attention_dropout=0.0)
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=16, use_sliding_window=False)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "mistral":
        # the default window (4096) is longer than the test sequences, so it is plain causal attention
        config = transformers.MistralConfig(**common)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(config).float()
    if kind == "qwen2":
        # Qwen2 has q/k/v biases, initialized to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.normal_(0, 0.1)
    return model


def full_batch(step: int, dp_rank: int, batch_size: int, seq_len: int, seed: int = 0,
               packed: bool = False) -> Dict[str, torch.Tensor]:
    """The unsharded batch of data-parallel replica ``dp_rank`` at ``step``: random tokens, labels with
    ``-100`` on a prompt prefix of random length and on random positions (uneven valid counts per rank).
    ``packed``: the rows hold 3-5 documents of random lengths, one packing for the batch, given as
    ``position_ids`` ``[1, S]`` that restart at 0 per document (as transformers' flattening collator does)."""
    g = torch.Generator().manual_seed(seed * 100003 + step * 101 + dp_rank)
    if packed:
        n_docs = int(torch.randint(3, 6, (1,), generator=g))
        cuts = sorted((torch.randperm(seq_len - 1, generator=g)[:n_docs - 1] + 1).tolist())
        starts = torch.zeros(seq_len, dtype=torch.long)
        starts[cuts] = 1
        doc = starts.cumsum(0)
        first = torch.tensor([0] + cuts)
        position_ids = (torch.arange(seq_len) - first[doc]).unsqueeze(0)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
    labels = input_ids.clone()
    for b in range(batch_size):
        prompt = int(torch.randint(0, seq_len // 2, (1,), generator=g))
        labels[b, :prompt] = -100
    labels[torch.rand(batch_size, seq_len, generator=g) < 0.2] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = position_ids
    return batch


def ds_config(ulysses: int, ring: int, batch_size: int, clip: float = 0.0, kernel: str = "auto",
              optim: str = "sgd", fpdt: Optional[dict] = None, zero_stage: int = 3,
              keep_attention_output: Union[bool, str] = True, mlp_tile_tokens: Optional[int] = None,
              loss_tile_tokens: Optional[int] = None, checkpoint_offload: bool = False,
              grad_accum: int = 1, checkpoint_layers: Optional[int] = None,
              host_optimizer_states: bool = False, checkpoint_every: int = 1) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip,
        "optimizer": OPTIMIZERS[optim],
        "zero_allow_untested_optimizer": True,  # torch SGD: elementwise, partitions like any optimizer
        # persistence threshold 0: even the tiny model's parameters are partitioned
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0,
                              "reduce_bucket_size": 2000, "stage3_prefetch_bucket_size": 2000},
        "long_context": {"ulysses_degree": ulysses, "ring_degree": ring, "kernel": kernel, "fpdt": fpdt or {},
                         "keep_attention_output": keep_attention_output, "mlp_tile_tokens": mlp_tile_tokens,
                         "loss_tile_tokens": loss_tile_tokens, "checkpoint_offload": checkpoint_offload,
                         "checkpoint_layers": checkpoint_layers, "host_optimizer_states": host_optimizer_states,
                         "checkpoint_every": checkpoint_every},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def train_with_deepspeed(kind: str, ulysses: int, ring: int, steps: int, seq_len: int, batch_size: int = 1,
                         seed: int = 0, clip: float = 0.0, optim: str = "sgd", kernel: str = "auto",
                         fpdt: Optional[dict] = None, zero_stage: int = 3, checkpointing: Optional[str] = None,
                         mlp_tile_tokens: Optional[int] = None, loss_in_model: bool = False,
                         loss_tile_tokens: Optional[int] = None, checkpoint_offload: bool = False,
                         grad_accum: int = 1, packed: bool = False, checkpoint_layers: Optional[int] = None,
                         host_optimizer_states: bool = False, checkpoint_every: int = 1) -> dict:
    """Every rank: ZeRO training through ``ds_longctx.initialize``. Returns this rank's per-step losses,
    local-kernel forward calls and host bytes leased at the end of the forward, coordinates, what DeepSpeed
    was told, and (rank 0) the final full parameters.

    ``checkpointing``: None, ``"keep"`` (transformers' gradient checkpointing enabled before initialize,
    attention outputs kept), ``"reruns"`` (the same, ``keep_attention_output: "reruns"``) or ``"recompute"``
    (enabled on the engine's module after initialize, ``keep_attention_output: false``). ``loss_in_model``: the
    loss comes back as the model output's ``.loss`` (``shift_labels=`` in the call; tiled from the hidden states
    with ``loss_tile_tokens``). ``grad_accum``: micro-batches per optimizer step; micro-batch ``m`` of replica
    ``d`` is the reference's replica ``d * grad_accum + m`` (a step averages over replicas and micro-batches
    alike), one loss per micro-batch.
    ``packed``: batches of packed documents (:func:`full_batch`), their boundaries passed to the model.
    ``checkpoint_layers``: the block's (only the first layers checkpointed). ``host_optimizer_states``: the block's
    (the optimizer block's AdamW as HostStateAdamW, its moments in host memory). ``checkpoint_every``: the block's
    (only every N-th checkpointed layer keeps its input)."""
    import deepspeed

    import ds_longctx
    from ds_longctx.memory import default_pool
    from tests.dist_cases import counted_kernel_forwards

    os.environ.setdefault("LOCAL_RANK", "0")
    _quiet()
    model = build_model(kind, seq_len, seed)
    if checkpointing in ("keep", "reruns"):
        model.gradient_checkpointing_enable()
    config = ds_config(ulysses, ring, batch_size, clip, kernel, optim, fpdt, zero_stage,
                       keep_attention_output={"recompute": False, "reruns": "reruns"}.get(checkpointing, True),
                       mlp_tile_tokens=mlp_tile_tokens,
                       loss_tile_tokens=loss_tile_tokens, checkpoint_offload=checkpoint_offload,
                       grad_accum=grad_accum, checkpoint_layers=checkpoint_layers,
                       host_optimizer_states=host_optimizer_states, checkpoint_every=checkpoint_every)
    engine, _, _, _ = ds_longctx.initialize(model=model, model_parameters=model.parameters(), config=config)
    if checkpointing == "recompute":
        engine.module.gradient_checkpointing_enable()
    lc = engine.long_context
    topo = lc.topology
    partitioned = zero_stage == 3 and all(p.ds_numel > p.ds_tensor.numel() for p in engine.module.parameters()
                                          if p.ds_numel >= topo.world_size)
    losses: List[float] = []
    forwards: List[int] = []
    leased: List[int] = []
    for step, micro in ((s, m) for s in range(steps) for m in range(grad_accum)):
        batch = lc.shard_batch(full_batch(step, topo.dp_rank * grad_accum + micro, batch_size, seq_len, seed,
                                          packed=packed))
        inputs = {key: batch[key] for key in ("input_ids", "position_ids", "cu_seq_lens_q") if key in batch}
        assert packed == ("cu_seq_lens_q" in inputs)
        with counted_kernel_forwards() as counted:
            if loss_in_model:
                out = engine(**inputs, shift_labels=batch["shift_labels"])
                loss = out.loss
                logits_kept = out.logits.shape[1]
            else:
                out = engine(**inputs)
                loss = lc.loss(getattr(out, "logits", out), batch["shift_labels"])
                logits_kept = None
            leased.append(default_pool().leased_bytes)
            engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        forwards.append(counted.forwards)
    params: Optional[Dict[str, torch.Tensor]] = None
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero_stage == 3):
        if topo.rank == 0:
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    info = {"rank": topo.rank, "dp_rank": topo.dp_rank, "sp": topo.sp, "dp": topo.dp,
            "seq_dp_world": engine.seq_dp_world_size, "sp_size_seen_by_ds": engine.sequence_parallel_size,
            "params_partitioned_over_world": partitioned, "logits_kept": logits_kept,
            "attn_impl": getattr(getattr(engine.module, "config", None), "_attn_implementation", None),
            "basic_optimizer": type(engine.basic_optimizer).__name__}
    engine.destroy()
    # ds_longctx's groups (the Topology's, the mpu's) go with the engine: none is left to slow later runs down
    info.update(groups_released=topo.destroyed)
    return {"losses": losses, "forwards": forwards, "leased_after_forward": leased, "params": params, "info": info}


def save_and_resume(kind: str, ulysses: int, ring: int, ckpt_dir: str, steps_before: int, steps_after: int,
                    resume_as=None, seq_len: int = 48, batch_size: int = 2, optim: str = "adamw",
                    host_optimizer_states: bool = False) -> dict:
    """Every rank: train ``steps_before`` steps through ``ds_longctx.initialize``, ``engine.save_checkpoint``,
    train ``steps_after`` more (the uninterrupted run); then a fresh engine on a model of other initial
    weights, with ``resume_as = (ulysses, ring)`` (default: the same), ``engine.load_checkpoint`` and the same
    ``steps_after`` steps (the resumed run). Returns both runs' losses, the restored step counts, and (rank 0)
    the parameters right after loading next to DeepSpeed's fp32 consolidation of the checkpoint."""
    import deepspeed
    import torch.distributed as dist

    import ds_longctx

    os.environ.setdefault("LOCAL_RANK", "0")
    _quiet()

    def engine_for(u, r, seed):
        model = build_model(kind, seq_len, seed)
        config = ds_config(u, r, batch_size, optim=optim, host_optimizer_states=host_optimizer_states)
        # a scheduler whose state matters: the resumed run must continue its warmup, not restart it
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3,
                                                              "warmup_num_steps": 10}}
        engine, _, _, _ = ds_longctx.initialize(model=model, model_parameters=model.parameters(), config=config)
        return engine

    def run(engine, steps):
        lc = engine.long_context
        losses = []
        for step in steps:
            batch = lc.shard_batch(full_batch(step, lc.topology.dp_rank, batch_size, seq_len))
            out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
            loss = lc.loss(getattr(out, "logits", out), batch["shift_labels"])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return losses

    def gathered(engine):
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()} if dist.get_rank() == 0 else None

    engine = engine_for(ulysses, ring, seed=0)
    run(engine, range(steps_before))
    engine.save_checkpoint(ckpt_dir, tag="step")
    saved = gathered(engine)
    uninterrupted = run(engine, range(steps_before, steps_before + steps_after))
    engine.destroy()

    u, r = resume_as or (ulysses, ring)
    engine = engine_for(u, r, seed=1)
    before_load = gathered(engine)
    path, _ = engine.load_checkpoint(ckpt_dir, tag="step")
    loaded = gathered(engine)
    restored_steps = (engine.global_steps, engine.lr_scheduler.last_batch_iteration)
    basic_optimizer = type(engine.basic_optimizer).__name__
    resumed = run(engine, range(steps_before, steps_before + steps_after))
    engine.destroy()
    consolidated = None
    dist.barrier()
    if dist.get_rank() == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        consolidated = {n: t.detach().clone() for n, t in
                        get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag="step").items()}
    dist.barrier()
    return {"uninterrupted": uninterrupted, "resumed": resumed, "loaded_from": path, "restored_steps": restored_steps,
            "basic_optimizer": basic_optimizer,
            "saved": saved, "before_load": before_load, "loaded": loaded, "consolidated": consolidated}


def dataloader_batches(ulysses: int, ring: int, samples: int = 16, seq_len: int = 48, batch_size: int = 2) -> dict:
    """Every rank: ``ds_longctx.initialize(training_data=<map-style dataset>)``, then one epoch of the
    dataloader DeepSpeed returns, each batch sharded (``ShardedLoader``) and trained on. Returns the sample
    indices this rank was given, per batch, and the losses."""
    import ds_longctx
    from ds_longctx.integration.data import ShardedLoader

    os.environ.setdefault("LOCAL_RANK", "0")
    _quiet()

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return samples

        def __getitem__(self, i):
            b = full_batch(0, i, 1, seq_len)
            return {"index": i, "input_ids": b["input_ids"][0], "labels": b["labels"][0]}

    model = build_model("llama", seq_len)
    engine, _, loader, _ = ds_longctx.initialize(model=model, model_parameters=model.parameters(),
                                                 training_data=Samples(), config=ds_config(ulysses, ring, batch_size))
    lc = engine.long_context
    loader.num_local_io_workers = 0  # the test pool's ranks are daemon processes, which may not fork loaders
    indices, losses = [], []
    for batch in ShardedLoader(loader, lc.topology):
        indices.append(batch["index"].tolist())
        out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        loss = lc.loss(out.logits, batch["shift_labels"])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    info = {"rank": lc.topology.rank, "dp_rank": lc.topology.dp_rank, "sp_rank": lc.topology.sp_rank}
    engine.destroy()
    return {"indices": indices, "losses": losses, "info": info}


def train_single_process(kind: str, dp: int, steps: int, seq_len: int, batch_size: int = 1, seed: int = 0,
                         clip: float = 0.0, optim: str = "sgd", packed: bool = False) -> dict:
    """The reference: one process, no DeepSpeed, no sequence parallelism, the model's own attention (sdpa).
    ``packed``: transformers itself keeps each token inside its document, from the restarting position ids.

    The ``dp`` replicas' batches are processed in turn and their losses averaged (DeepSpeed averages
    gradients over data-parallel ranks); each replica's loss is its mean over valid next-token targets.
    """
    model = build_model(kind, seq_len, seed)
    if kind != "plain":
        model.set_attn_implementation("sdpa")
    opt = _torch_optimizer(optim, model.parameters())
    losses: List[List[float]] = []
    clipped: List[bool] = []
    for step in range(steps):
        opt.zero_grad()
        per_replica = []
        for d in range(dp):
            batch = full_batch(step, d, batch_size, seq_len, seed, packed=packed)
            ids = batch["input_ids"]
            if packed:  # without a cache transformers reads the documents from the position ids
                out = model(input_ids=ids, position_ids=batch["position_ids"].expand_as(ids), use_cache=False)
            else:
                out = model(input_ids=ids, position_ids=torch.arange(seq_len).expand_as(ids))
            logits = getattr(out, "logits", out)
            # the model's own shift-inside loss, to check ours against an independent implementation
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(),
                                                     batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
            (loss / dp).backward()
            per_replica.append(loss.item())
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            clipped.append(bool(norm > clip))
        opt.step()
        losses.append(per_replica)
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "clipped": clipped}


def _quiet():
    """Keep DeepSpeed's per-rank info logs and deprecation warnings out of the test output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def initialize_error(case: str) -> str:
    """Every rank: call ``ds_longctx.initialize`` with a user error of kind ``case``; return what it raised
    (type and message), so the test can check that every rank raised the same error and none hung."""
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")
    _quiet()
    rank = dist.get_rank()
    seq_len = 32
    model = build_model("llama", seq_len)  # 4 query heads, 2 kv heads
    config = ds_config(2, 2, 1)
    kwargs = {}
    if case == "blocks_differ":
        config["long_context"]["ring_degree"] = 2 if rank != 3 else 1
        config["long_context"]["ulysses_degree"] = 2 if rank != 3 else 4
    elif case == "unreadable_on_one_rank":
        config = ds_config(2, 2, 1) if rank != 2 else "/nonexistent/ds_config.json"
    elif case == "invalid_on_one_rank":
        if rank == 1:
            config["long_context"]["fpdt"] = {"chunk_size": 0}
    elif case == "degrees_do_not_divide_world":
        config["long_context"].update(ulysses_degree=3, ring_degree=1)
    elif case == "more_ulysses_ranks_than_heads":
        config["long_context"].update(ulysses_degree=4, ring_degree=1)
        model = build_model("llama", seq_len)
        model.config.num_attention_heads = 2  # what the check reads; the model is never run
        model.config.num_key_value_heads = 2
    elif case == "own_mpu":
        kwargs["mpu"] = object()
    elif case == "deepspeed_sequence_parallel_key":
        config["sequence_parallel_size"] = 4
    elif case == "config_given_twice":
        import argparse

        template = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "ds_config_templates", "cpu_smoke.json")
        kwargs["args"] = argparse.Namespace(deepspeed_config=template, local_rank=0)
    elif case == "preflight_does_not_fit":  # a 64 KiB "GPU": the step's parameters alone do not fit
        os.environ["DS_LONGCTX_MACHINE"] = '{"gpu_memory_gib": 0.0000625, "host_memory_gib": 64}'
        config["long_context"]["seq_len"] = seq_len
    elif case == "auto_without_seq_len_or_gpu":  # no machine to plan for: no batch can resolve it later
        config["long_context"]["mlp_tile_tokens"] = "auto"
    elif case == "checkpoint_layers_beyond_the_model":
        config["long_context"]["checkpoint_layers"] = LAYERS + 1
    else:
        raise ValueError(case)
    try:
        return _initialize_error(model, config, kwargs)
    finally:
        os.environ.pop("DS_LONGCTX_MACHINE", None)


def host_optimizer_error(case: str) -> str:
    """Every rank: ``ds_longctx.initialize`` with ``host_optimizer_states`` and a config or call it cannot honour;
    return what it raised."""
    os.environ.setdefault("LOCAL_RANK", "0")
    _quiet()
    model = build_model("llama", 32)
    config = ds_config(1, 1, 1, optim="adamw", host_optimizer_states=True)
    kwargs = {}
    if case == "optimizer_object":
        kwargs["optimizer"] = torch.optim.AdamW(model.parameters())
    elif case == "offload_optimizer":
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    elif case == "no_optimizer_block":
        del config["optimizer"]
    elif case == "unsupported_type":
        config["optimizer"] = OPTIMIZERS["sgd"]
    elif case == "adam_with_l2_weight_decay":
        config["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.1, "adam_w_mode": False}}
    elif case == "amsgrad":
        config["optimizer"]["params"]["amsgrad"] = True
    else:
        raise ValueError(case)
    return _initialize_error(model, config, kwargs)


def _initialize_error(model, config, kwargs) -> str:
    """What ``ds_longctx.initialize`` raised for this model and config (``"no error"`` when nothing)."""
    import ds_longctx

    try:
        ds_longctx.initialize(model=model, model_parameters=model.parameters(), config=config, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def batch_error(case: str, ulysses: int, ring: int) -> str:
    """Every rank: shard a batch that is bad on data-parallel replica 1 only; return what was raised."""
    from ds_longctx.integration.data import shard_batch

    topo = _topology(ulysses, ring)
    seq_len = 32
    batch = full_batch(0, topo.dp_rank, 1, seq_len)
    if topo.dp_rank == 1:
        if case == "length":
            batch = full_batch(0, topo.dp_rank, 1, seq_len - 2)
        elif case == "padding_mask":
            mask = torch.ones(1, seq_len, dtype=torch.long)
            mask[0, -3:] = 0
            batch["attention_mask"] = mask
        elif case == "labels_shape":
            batch["labels"] = batch["labels"][:, :-1]
        elif case == "rows_packed_differently":
            batch = full_batch(0, topo.dp_rank, 2, seq_len)
            batch["position_ids"] = torch.stack([torch.arange(seq_len), torch.arange(seq_len) % 16])
        elif case == "boundaries_disagree":
            batch["position_ids"] = (torch.arange(seq_len) % 16).unsqueeze(0)
            batch["cu_seq_lens_q"] = torch.tensor([0, 8, seq_len], dtype=torch.int32)
        elif case == "boundaries_range":
            batch["cu_seq_lens_q"] = torch.tensor([0, 8, seq_len + 1], dtype=torch.int32)
        else:
            raise ValueError(case)
    try:
        shard_batch(batch, topo)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


_TOPOLOGIES: dict = {}


def _topology(ulysses: int, ring: int):
    """One Topology per factorization per worker (building one is collective: all ranks, same order)."""
    from ds_longctx.topology import Topology

    if (ulysses, ring) not in _TOPOLOGIES:
        _TOPOLOGIES[ulysses, ring] = Topology(ulysses=ulysses, ring=ring)
    return _TOPOLOGIES[ulysses, ring]


def sharded_batch_and_loss(ulysses: int, ring: int, seed: int = 0) -> dict:
    """Every rank: shard a batch, check the sharded labels against the full ones, and train one step of a
    replicated linear head on the sharded features with :func:`causal_lm_loss`; return the head's gradient
    averaged over all ranks (what DeepSpeed applies) and the loss, for comparison with the unsharded ones."""
    import torch.distributed as dist

    from ds_longctx.integration.data import shard_batch
    from ds_longctx.integration.loss import causal_lm_loss

    topo = _topology(ulysses, ring)
    B, S, E = 2, 48, 8
    batch = full_batch(7, topo.dp_rank, B, S, seed)
    g = torch.Generator().manual_seed(seed + 17 * topo.dp_rank)
    features = torch.randn(B, S, E, generator=g, dtype=torch.float64)
    batch["features"] = features
    batch["attention_mask"] = torch.ones(B, S, dtype=torch.long)
    local = shard_batch(batch, topo)
    pos = local["position_ids"][0]
    full_targets = torch.cat([batch["labels"][:, 1:], torch.full((B, 1), -100)], dim=1)
    labels_ok = bool(torch.equal(local["shift_labels"], full_targets[:, pos]))
    ids_ok = bool(torch.equal(local["input_ids"], batch["input_ids"][:, pos]))
    head = torch.nn.Linear(E, VOCAB, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        head.bias.zero_()
    loss = causal_lm_loss(head(local["features"]), local["shift_labels"], topo)
    loss.backward()
    grad = head.weight.grad.clone()
    dist.all_reduce(grad)
    grad /= topo.world_size
    return {"loss": loss.item(), "grad": grad, "dp_rank": topo.dp_rank, "labels_ok": labels_ok, "ids_ok": ids_ok,
            "keys": sorted(local), "local_len": local["input_ids"].shape[1], "positions": pos.tolist(),
            "weight": head.weight.detach().clone(), "features": features, "labels": batch["labels"]}


def hf_forward_matches_full(kind: str, ulysses: int, ring: int, seq_len: int = 48) -> float:
    """Every rank: a transformers model switched to the distributed attention, called on its shard without
    position_ids (the pre-hook fills in global positions); returns the max relative error of its logits
    against the same model's full-sequence logits (own sdpa attention) at this rank's positions."""
    from ds_longctx.config import LongContextConfig
    from ds_longctx.integration.context import LongContext
    from ds_longctx.integration.hf import apply
    from ds_longctx.layout import positions

    topo = _topology(ulysses, ring)
    reference = build_model(kind, seq_len).double()
    reference.set_attn_implementation("sdpa")
    model = build_model(kind, seq_len).double()
    cfg = LongContextConfig.from_block({"ulysses_degree": ulysses, "ring_degree": ring, "kernel": "reference"})
    apply(model, LongContext(topo, cfg))
    ids = full_batch(3, topo.dp_rank, 2, seq_len)["input_ids"]
    pos = positions(seq_len, topo)
    with torch.no_grad():
        full = reference(input_ids=ids).logits[:, pos]
        mine = model(input_ids=ids[:, pos]).logits
    return ((mine - full).norm() / full.norm()).item()


def hf_checkpoint_layers_vs_float64(ulysses: int, ring: int, block: dict, seq_len: int = 48, layers: int = 4) -> dict:
    """Every rank: a float64 ``layers``-layer Llama with transformers' gradient checkpointing on every layer,
    switched to the distributed attention with ``block`` (``checkpoint_layers`` among it), one forward and
    backward of its shard's group loss. Returns the relative errors of the loss and of every parameter's gradient
    (averaged over the sequence-parallel group, as DeepSpeed averages) against the same model without
    checkpointing on the full sequence (its own sdpa attention, one process: ``"reference"``) and against the
    same distributed model without checkpointing (``"unchecked"``), and how often each layer's o-projection ran
    (twice: recomputed)."""
    import torch.distributed as dist

    from ds_longctx.config import LongContextConfig
    from ds_longctx.integration.context import LongContext
    from ds_longctx.integration.hf import apply

    topo = _topology(ulysses, ring)
    full = full_batch(0, topo.dp_rank, 2, seq_len)
    reference = build_model("llama", seq_len, layers=layers).double()
    reference.set_attn_implementation("sdpa")
    logits = reference(input_ids=full["input_ids"]).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), full["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100)
    want.backward()
    runs = [0] * layers

    def distributed(checkpointing: bool):
        model = build_model("llama", seq_len, layers=layers).double()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        lc = LongContext(topo, LongContextConfig.from_block({"ulysses_degree": ulysses, "ring_degree": ring,
                                                             "kernel": "reference", **block}))
        apply(model, lc)
        for i, layer in enumerate(model.model.layers if checkpointing else ()):
            # the o-projection runs in every forward and recompute, before a recompute's early stop (in the MLP)
            layer.self_attn.o_proj.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
        batch = lc.shard_batch(full)
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     shift_labels=batch["shift_labels"]).loss
        loss.backward()
        grads = []
        for p in model.parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad, group=topo.sp_group)
            grads.append(grad / topo.sp)  # every rank's loss is the group's: DeepSpeed averages the ranks' gradients
        return loss, grads

    loss, grads = distributed(checkpointing=True)
    plain_loss, plain_grads = distributed(checkpointing=False)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    names = [name for name, _ in reference.named_parameters()]
    return {"reference": {"loss": abs(loss.item() - want.item()) / abs(want.item()),
                          **{n: rel(g, q.grad) for n, g, q in zip(names, grads, reference.parameters())}},
            "unchecked": {"loss": abs(loss.item() - plain_loss.item()) / abs(plain_loss.item()),
                          **{n: rel(g, q) for n, g, q in zip(names, grads, plain_grads)}},
            "runs": runs}


def model_labels_error(ulysses: int, ring: int) -> str:
    """Every rank: call a sequence-parallel Llama with the model's own ``labels=``; return what was raised."""
    from ds_longctx.config import LongContextConfig
    from ds_longctx.integration.context import LongContext
    from ds_longctx.integration.hf import apply

    topo = _topology(ulysses, ring)
    model = build_model("llama", 32)
    lc = LongContext(topo, LongContextConfig.from_block({"ulysses_degree": ulysses, "ring_degree": ring}))
    apply(model, lc)
    batch = lc.shard_batch(full_batch(0, topo.dp_rank, 1, 32))
    try:
        model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def sliding_window_error(ulysses: int, ring: int) -> str:
    """Every rank: a Mistral model whose sliding window is shorter than the sequence; return what was raised."""
    from ds_longctx.config import LongContextConfig
    from ds_longctx.integration.context import LongContext
    from ds_longctx.integration.hf import apply

    topo = _topology(ulysses, ring)
    model = build_model("mistral", 64)
    model.config.sliding_window = 16
    apply(model, LongContext(topo, LongContextConfig.from_block({"ulysses_degree": ulysses, "ring_degree": ring})))
    ids = full_batch(0, topo.dp_rank, 1, 64)["input_ids"]
    try:
        from ds_longctx.layout import shard
        model(input_ids=shard(ids, topo))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# ---- "auto" values resolved at the first batch -----------------------------------------------------------

#: Every value of the block the planner chooses, "auto".
ALL_AUTO = {"fpdt": {"chunk_size": "auto", "offload": "auto"}, "keep_attention_output": "auto",
            "checkpoint_offload": "auto", "checkpoint_every": "auto", "mlp_tile_tokens": "auto",
            "loss_tile_tokens": "auto"}
#: ... and the checkpointed layers too: resolved for one length, they fill the GPU with that length's activations,
#: so the cases of longer later batches leave them to the default.
LAYERS_AUTO = {**ALL_AUTO, "checkpoint_layers": "auto"}
AUTO_WORLD, AUTO_HOST_GIB = 4, 64


def auto_config(ulysses: int, ring: int, batch_size: int, seq_len: Optional[int] = None,
                auto: Optional[dict] = None) -> dict:
    """:func:`ds_config` with the planner values of ``auto`` (default :data:`ALL_AUTO`) "auto" (and ``seq_len``
    in the block when given)."""
    config = ds_config(ulysses, ring, batch_size)
    config["long_context"].update(auto or ALL_AUTO)
    if seq_len is not None:
        config["long_context"]["seq_len"] = seq_len
    return config


def planned_block(ulysses: int, ring: int, batch_size: int, seq_len: int, gpu_kib: int,
                  auto: Optional[dict] = None) -> Optional[dict]:
    """In this process: the planner's block for the checkpointed tiny Llama on :data:`AUTO_WORLD` GPUs of
    ``gpu_kib`` KiB (hosts of :data:`AUTO_HOST_GIB` GiB) at ``seq_len`` tokens, or None when nothing fits."""
    from ds_longctx.config import LongContextConfig
    from ds_longctx.plan.machine import GIB, Machine
    from ds_longctx.plan.preflight import PlanError, prepare

    config = auto_config(ulysses, ring, batch_size, auto=auto)
    machine = Machine(gpus=AUTO_WORLD, gpu_memory=gpu_kib * 1024, host_memory=AUTO_HOST_GIB * GIB,
                      gpus_per_node=AUTO_WORLD)
    model = build_model("llama", seq_len)
    try:
        cfg = prepare(LongContextConfig.from_block(config["long_context"]), model.config, config, AUTO_WORLD,
                      seq_len, machine, micro_batch=batch_size, checkpointing=True)
    except PlanError:
        return None
    return cfg.model_dump(mode="json")


def smallest_gpu_kib(ulysses: int, ring: int, batch_size: int, seq_len: int) -> int:
    """The smallest GPU (KiB) on which the planner fits the tiny Llama at ``seq_len`` tokens: there the
    fastest fitting configuration is the leanest one (values other than the defaults), and longer
    sequences do not fit."""
    lo, hi = 1, 1 << 22  # 4 GiB fits; fitting is monotonic in the GPU's memory
    while lo < hi:
        mid = (lo + hi) // 2
        if planned_block(ulysses, ring, batch_size, seq_len, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


class _Resolved:
    """Log handler counting the "auto values resolved" records of ds_longctx's logger."""

    def __init__(self):
        import logging

        self.count = 0
        outer = self

        class Handler(logging.Handler):
            def emit(self, record):
                outer.count += "auto values resolved" in record.getMessage()

        self.handler = Handler()
        self.logger = logging.getLogger("ds_longctx")
        self.logger.addHandler(self.handler)

    def close(self):
        self.logger.removeHandler(self.handler)


def auto_from_first_batch(ulysses: int, ring: int, gpu_kib: int, lengths: List[List[int]],
                          seq_len_in_block: Optional[int] = None, batch_size: int = 2,
                          without_shard_batch: bool = False, auto: Optional[dict] = None) -> dict:
    """Every rank: ZeRO-3 training of the checkpointed tiny Llama whose block leaves every planner value
    "auto", on GPUs of ``gpu_kib`` KiB (``DS_LONGCTX_MACHINE``), through ``engine.long_context.shard_batch``.

    ``lengths[step][dp_rank]``: the global sequence length of each step's batch on each replica.
    ``seq_len_in_block``: also set ``long_context.seq_len`` (initialize resolves the values then).
    ``without_shard_batch``: the first step calls the model on a slice of the batch instead.
    ``auto``: the block's "auto" values (default :data:`ALL_AUTO`).
    Returns the block after initialize and after the last step, losses and kernel forwards per step, the
    first error raised (``"Type: message"``, training stops there) and how many times this rank logged the
    resolved values."""
    import ds_longctx
    from tests.dist_cases import counted_kernel_forwards

    os.environ.setdefault("LOCAL_RANK", "0")
    _quiet()
    model = build_model("llama", max(max(step) for step in lengths))
    model.gradient_checkpointing_enable()
    config = auto_config(ulysses, ring, batch_size, seq_len_in_block, auto=auto)
    os.environ["DS_LONGCTX_MACHINE"] = json.dumps({"gpu_memory_gib": gpu_kib / 2 ** 20,
                                                   "host_memory_gib": AUTO_HOST_GIB})
    logged = _Resolved()
    try:
        engine, _, _, _ = ds_longctx.initialize(model=model, model_parameters=model.parameters(), config=config)
    finally:
        os.environ.pop("DS_LONGCTX_MACHINE", None)
    lc = engine.long_context
    after_initialize = lc.config.model_dump(mode="json")
    losses: List[float] = []
    forwards: List[int] = []
    error = None
    try:
        for step, per_replica in enumerate(lengths):
            full = full_batch(step, lc.topology.dp_rank, batch_size, per_replica[lc.topology.dp_rank])
            if without_shard_batch:
                local = full["input_ids"][:, :full["input_ids"].shape[1] // lc.topology.sp]
                engine(input_ids=local)
            batch = lc.shard_batch(full)
            with counted_kernel_forwards() as counted:
                out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
                loss = lc.loss(out.logits, batch["shift_labels"])
                engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            forwards.append(counted.forwards)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        error = f"{type(exc).__name__}: {exc}"
    finally:
        logged.close()
    result = {"after_initialize": after_initialize, "block": lc.config.model_dump(mode="json"), "losses": losses,
              "forwards": forwards, "error": error, "logged": logged.count, "dp_rank": lc.topology.dp_rank}
    engine.destroy()
    return result
