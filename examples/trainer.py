"""Fine-tune a small Llama-style model with transformers' Trainer (or TRL's SFTTrainer) and sequence parallelism.

    deepspeed --num_gpus 2 examples/trainer.py --deepspeed ds_config_templates/trainer_cpu_smoke.json
    deepspeed --num_gpus 2 examples/trainer.py --deepspeed ds_config_templates/trainer_cpu_smoke.json --trl
    deepspeed --num_gpus 2 examples/trainer.py --deepspeed ds_config_templates/trainer_cpu_smoke.json --packed

An ordinary Trainer script: the DeepSpeed config carries a ``long_context`` block and ``LongContextTrainer``
stands where ``transformers.Trainer`` stood (``LongContextSFTTrainer`` for ``trl.SFTTrainer``). Any
``TrainingArguments`` flag works (``--max_steps``, ``--gradient_accumulation_steps``, ``--save_steps``,
``--resume_from_checkpoint``, ``--activation_checkpointing``...). Everything is embedded: the model is built
from a config and the text is the Python standard library's source code, byte by byte (256 tokens).
``--packed`` trains on windows of random length packed padding-free by ``DataCollatorWithFlattening``.
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig

import torch
import transformers

from ds_longctx.trainer import LongContextTrainer

DEFAULTS = ["--output_dir", "trainer_output", "--max_steps", "30", "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "2", "--learning_rate", "3e-3", "--warmup_steps", "5",
            "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--include_num_input_tokens_seen", "true",
            "--remove_unused_columns", "false"]


def load_corpus(megabytes: float) -> bytes:
    """Bytes of the standard library's .py files (sorted, so every rank reads the same text)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, size = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "test", "tests"))
        for name in sorted(filenames):
            if name.endswith(".py") and size < megabytes * 2 ** 20:
                with open(os.path.join(dirpath, name), "rb") as f:
                    chunks.append(f.read())
                size += len(chunks[-1])
    return b"\n".join(chunks)


def windows(text: bytes, count: int, seq_len: int, packed: bool, seed: int) -> list:
    """``count`` windows of the text (``packed``: of 64..seq_len bytes) as ``{"input_ids", "labels"}`` lists."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(64, seq_len + 1, (1,), generator=g)) if packed else seq_len
        start = int(torch.randint(0, len(text) - length, (1,), generator=g))
        ids = list(text[start:start + length])
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def byte_tokenizer():
    """TRL wants a tokenizer: one token per byte, nothing downloaded."""
    from tokenizers import Tokenizer, models

    vocab = {f"<{i}>": i for i in range(256)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")),
                                                pad_token="<0>", eos_token="<10>")


def main():
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--trl", action="store_true", help="TRL's SFTTrainer (LongContextSFTTrainer)")
    own.add_argument("--packed", action="store_true", help="padding-free packing (DataCollatorWithFlattening)")
    own.add_argument("--seq_len", type=int, default=1024)
    own.add_argument("--hidden", type=int, default=128)
    own.add_argument("--layers", type=int, default=2)
    mine, rest = own.parse_known_args()
    if mine.trl:
        from trl import SFTConfig as Arguments

        from ds_longctx.trainer import LongContextSFTTrainer as TrainerClass
    else:
        Arguments, TrainerClass = transformers.TrainingArguments, LongContextTrainer
    defaults = DEFAULTS + (["--bf16", "false"] if mine.trl and not torch.cuda.is_available() else [])  # SFTConfig: bf16
    (args,) = transformers.HfArgumentParser(Arguments).parse_args_into_dataclasses(args=defaults + rest)

    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=mine.hidden, intermediate_size=int(mine.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=mine.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=mine.seq_len, tie_word_embeddings=True))
    text = load_corpus(4.0)
    split = int(len(text) * 0.95)
    train = windows(text[:split], 256, mine.seq_len, mine.packed, seed=1)
    held_out = windows(text[split:], 8, mine.seq_len, mine.packed, seed=2)
    collator = (transformers.DataCollatorWithFlattening() if mine.packed
                else transformers.default_data_collator)
    if mine.trl:
        from datasets import Dataset

        # TRL builds the labels (every token) and its own collator (padding-free with --packed)
        kwargs = dict(train_dataset=Dataset.from_list([{"input_ids": w["input_ids"]} for w in train]),
                      eval_dataset=Dataset.from_list([{"input_ids": w["input_ids"]} for w in held_out]),
                      processing_class=byte_tokenizer())
        if mine.packed:  # the windows are at most seq_len long already
            args.padding_free, args.max_length = True, None
    else:
        kwargs = dict(train_dataset=train, eval_dataset=held_out, data_collator=collator)

    trainer = TrainerClass(model=model, args=args, **kwargs)  # the constructor of the Trainer it replaces
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        topo = trainer.long_context.topology
        print(f"done: {topo.world_size} ranks = dp {topo.dp} x ring {topo.ring} x ulysses {topo.ulysses}, "
              f"{result.global_step} steps, train loss {result.training_loss:.4f}, "
              f"held-out loss {metrics['eval_loss']:.4f} (uniform over bytes: 5.5452)", flush=True)
    trainer.model_wrapped.destroy()
    torch.distributed.barrier()


if __name__ == "__main__":
    sys.exit(main())
