"""Training jobs for the Trainer tests (module-level so that gloo workers can run them by name).

``train_with_trainer`` runs on every rank: ``LongContextTrainer`` (or TRL's ``LongContextSFTTrainer``) with a
DeepSpeed ZeRO-3 config carrying the case's ``long_context`` block. ``train_single_process`` trains the same
model on the same samples with plain ``transformers.Trainer`` in one process (no DeepSpeed, the model's own
attention, the step's whole batch at once): the reference.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch

from tests.deepspeed_cases import VOCAB, _quiet, build_model

SEQ = 32
SAMPLES = 16
EVAL_SAMPLES = 8
LR = 0.5


def samples(n: int, seq_len: int, packed: bool, seed: int) -> List[Dict[str, list]]:
    """Token samples with ``-100`` labels on a random prompt prefix and random positions; ``packed``: documents
    of 5..seq_len tokens (the flattening collator packs them into one row per batch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, seq_len + 1, (1,), generator=g)) if packed else seq_len
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[:int(torch.randint(0, length // 2, (1,), generator=g))] = -100
        labels[torch.rand(length, generator=g) < 0.2] = -100
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def collator(packed: bool):
    from transformers import DataCollatorWithFlattening

    if packed:
        return DataCollatorWithFlattening()

    def stack(features):
        return {key: torch.tensor([f[key] for f in features]) for key in ("input_ids", "labels")}

    return stack


def tokenizer():
    """A word-level tokenizer over the test vocabulary (TRL wants one; nothing is downloaded)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1")


def training_arguments(out_dir: str, batch_size: int, steps: int, grad_accum: int, deepspeed: Optional[dict],
                       save_steps: Optional[int] = None, sft: bool = False, checkpointing: bool = False):
    """TrainingArguments (TRL: SFTConfig, padding-free batches) for an exact comparison: plain SGD at a
    constant rate (its update is linear in the gradient: a wrong scale shows), no clipping, a log per step."""
    if sft:
        from trl import SFTConfig as Arguments

        extra = dict(padding_free=True, bf16=False, max_length=None)
    else:
        from transformers import TrainingArguments as Arguments

        extra = {}
    return Arguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, max_steps=steps, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[],
        include_num_input_tokens_seen="all", use_cpu=deepspeed is None, deepspeed=deepspeed,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
        activation_checkpointing=checkpointing, **extra)


def ds_config(ulysses: int, ring: int, **block) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True,  # torch SGD from the Trainer
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "reduce_bucket_size": 2000, "stage3_prefetch_bucket_size": 2000},
            "long_context": {"ulysses_degree": ulysses, "ring_degree": ring, "kernel": "auto", **block},
            "steps_per_print": 10 ** 9}


def _losses(trainer) -> dict:
    history = trainer.state.log_history
    return {"losses": [h["loss"] for h in history if "loss" in h],
            "eval_loss": [h["eval_loss"] for h in history if "eval_loss" in h],
            "tokens_seen": trainer.state.num_input_tokens_seen}


def train_with_trainer(ulysses: int, ring: int, out_dir: str, steps: int = 3, batch_size: int = 1,
                       grad_accum: int = 1, packed: bool = False, evaluate: bool = False,
                       save_steps: Optional[int] = None, resume_from: Optional[str] = None,
                       sft: bool = False, seed: int = 0, memory: bool = False,
                       auto_on_gpu_gib: Optional[float] = None) -> dict:
    """Every rank: ``steps`` optimizer steps of a tiny Llama through the Trainer with ZeRO-3 and the block.
    ``memory``: the block's memory features (MLP and loss tiles, checkpoint offload) with the Trainer's
    gradient checkpointing. ``auto_on_gpu_gib``: every planner value of the block "auto" and no seq_len,
    planned for GPUs of that size (``DS_LONGCTX_MACHINE``): the first batch resolves them. Returns the
    logged per-step losses, eval losses, tokens seen, the engine's block at the end, and (rank 0) the final
    full parameters."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank()
    # what the deepspeed launcher sets (the pool's world is already initialized)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(dist.get_world_size()))
    _quiet()
    import transformers

    transformers.logging.set_verbosity_error()
    model = build_model("llama", SEQ, seed)
    block = dict(mlp_tile_tokens=4, loss_tile_tokens=4, checkpoint_offload=True) if memory else {}
    if auto_on_gpu_gib is not None:
        from tests.deepspeed_cases import ALL_AUTO

        block.update(ALL_AUTO)
        os.environ["DS_LONGCTX_MACHINE"] = json.dumps({"gpu_memory_gib": auto_on_gpu_gib, "host_memory_gib": 64})
    args = training_arguments(out_dir, batch_size, steps, grad_accum, ds_config(ulysses, ring, **block), save_steps,
                              sft, checkpointing=memory)
    if sft:
        from ds_longctx.trainer import LongContextSFTTrainer

        trainer = LongContextSFTTrainer(**sft_inputs(model, args, packed))
    else:
        from ds_longctx.trainer import LongContextTrainer

        trainer = LongContextTrainer(model=model, args=args, train_dataset=samples(SAMPLES, SEQ, packed, seed=1),
                                     eval_dataset=samples(EVAL_SAMPLES, SEQ, packed, seed=2) if evaluate else None,
                                     data_collator=collator(packed))
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        os.environ.pop("DS_LONGCTX_MACHINE", None)
    if evaluate:
        trainer.evaluate()
    engine = trainer.model_wrapped
    params = None
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        if rank == 0:
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if memory:  # the Trainer turned checkpointing on and ds_longctx's stashes took the layers' checkpoints
        from ds_longctx.memory.remat import StashingCheckpoint

        layers = engine.module.model.layers
        assert all(isinstance(layer._gradient_checkpointing_func, StashingCheckpoint) for layer in layers)
    info = {"world": trainer.args.world_size, "dp": trainer.replicas.dp,
            "attn_impl": engine.module.config._attn_implementation, "sp": engine.long_context.topology.sp}
    result = {**_losses(trainer), "params": params, "info": info,
              "block": engine.long_context.config.model_dump(mode="json")}
    engine.destroy()
    return result


def sft_inputs(model, args, packed: bool) -> dict:
    """SFTTrainer's arguments: a tokenized dataset (TRL builds the labels and its padding-free collator)."""
    from datasets import Dataset

    rows = [{"input_ids": s["input_ids"]} for s in samples(SAMPLES, SEQ, packed, seed=1)]
    return dict(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer())


def train_single_process(dp: int, out_dir: str, steps: int = 3, batch_size: int = 1, grad_accum: int = 1,
                         packed: bool = False, evaluate: bool = False, seed: int = 0, sft: bool = False) -> dict:
    """The reference: plain ``transformers.Trainer`` (``sft``: ``trl.SFTTrainer``) in this process, a batch of
    ``dp x batch_size`` samples (the step's batch of all replicas), the model's own sdpa attention, no DeepSpeed."""
    from transformers import Trainer

    model = build_model("llama", SEQ, seed)
    model.set_attn_implementation("sdpa")
    args = training_arguments(out_dir, dp * batch_size, steps, grad_accum, None, sft=sft)
    args.per_device_eval_batch_size = batch_size
    if sft:
        from trl import SFTTrainer

        trainer = SFTTrainer(**sft_inputs(model, args, packed))
    else:
        trainer = Trainer(model=model, args=args, train_dataset=samples(SAMPLES, SEQ, packed, seed=1),
                          eval_dataset=samples(EVAL_SAMPLES, SEQ, packed, seed=2) if evaluate else None,
                          data_collator=collator(packed))
    trainer.train()
    if evaluate:
        trainer.evaluate()
    return {**_losses(trainer), "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def trainer_setup_errors(out_dir: str) -> Dict[str, str]:
    """Every rank: LongContextTrainer with settings that cannot work under sequence parallelism (U x R = 2 x 2);
    returns what each raised."""
    import torch.distributed as dist

    from ds_longctx.trainer import LongContextTrainer

    rank = dist.get_rank()
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(dist.get_world_size()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # accelerate's multi-CPU state (no DeepSpeed) asks for it
    _quiet()
    data = samples(4, SEQ, False, seed=1)

    def attempt(name, build, run=None):
        try:
            trainer = build()
            if run is not None:
                run(trainer)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    def trainer(args=None, **kwargs):
        args = args or training_arguments(out_dir, 1, 1, 1, ds_config(2, 2))
        return LongContextTrainer(model=build_model("llama", SEQ), args=args, train_dataset=data,
                                  data_collator=collator(False), **kwargs)

    smoothing = training_arguments(out_dir, 1, 1, 1, ds_config(2, 2))
    smoothing.label_smoothing_factor = 0.1
    plain = training_arguments(out_dir, 1, 1, 1, None)
    errors = {
        "label_smoothing": attempt("label_smoothing", lambda: trainer(smoothing)),
        "loss_func": attempt("loss_func", lambda: trainer(compute_loss_func=lambda *a, **k: 0.0)),
        "metrics": attempt("metrics", lambda: trainer(compute_metrics=lambda p: {})),
        "no_deepspeed": attempt("no_deepspeed", lambda: trainer(plain)),
        "predict": attempt("predict", trainer, lambda t: t.predict(data)),
    }
    return errors
