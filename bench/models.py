"""Model shapes of the training benchmark: named presets of real Llama models (random init, built from a
transformers config: nothing is downloaded) and the parameter count the FLOP rate uses.

``--model llama3.2-3b`` and ``--model llama3.1-8b`` are those models' shapes at full depth; ``--layers`` (or
any other shape flag) overrides one field, e.g. ``--model llama3.1-8b --layers 4`` is a 4-layer slice of the
same width and vocabulary. Without ``--model`` the shape is the bench's historical default (a 4-layer slice of
Llama-3-8B with a byte vocabulary) unless flags say otherwise.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The fields of a Llama config that size the model (RoPE base 500000 in all of them)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6


PRESETS: Dict[str, ModelShape] = {
    # meta-llama/Llama-3.2-3B: its LM head is its input embedding
    "llama3.2-3b": ModelShape(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, vocab=128256,
                              tie_word_embeddings=True, rms_norm_eps=1e-5),
    # meta-llama/Llama-3.1-8B
    "llama3.1-8b": ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256,
                              tie_word_embeddings=False, rms_norm_eps=1e-5),
}
# The bench's shape before presets existed: 4 layers of Llama-3-8B's width, bytes for tokens.
DEFAULT_SHAPE = ModelShape(layers=4, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=256)
SHAPE_FLAGS = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "tie_word_embeddings")


def resolve_shape(model: Optional[str], **overrides) -> ModelShape:
    """The preset named ``model`` (or the default shape), with every override that is not None replacing
    its field (the keys of ``SHAPE_FLAGS``). An unknown preset raises ``ValueError`` naming the choices."""
    if model is not None and model not in PRESETS:
        raise ValueError(f"--model {model!r}: choose one of {sorted(PRESETS)}")
    base = PRESETS[model] if model is not None else DEFAULT_SHAPE
    unknown = set(overrides) - set(SHAPE_FLAGS)
    if unknown:
        raise ValueError(f"not shape fields: {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "tie_word_embeddings" in given:
        given["tie_word_embeddings"] = bool(given["tie_word_embeddings"])
    return dataclasses.replace(base, **given)


def llama_config(shape: ModelShape, max_positions: int):
    """A transformers ``LlamaConfig`` of ``shape`` with SDPA attention and room for ``max_positions`` tokens."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions, rope_theta=500000.0, rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=shape.tie_word_embeddings, attn_implementation="sdpa")


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters a token meets in a matmul, for the 6 x params x tokens FLOP count: all but the input
    embedding (a lookup, no matmul). A tied LM head is still a matmul over the vocabulary: it counts,
    although its weight is the embedding's, which ``model.parameters()`` lists only once."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    n = sum(p.numel() for p in model.parameters() if p is not embedding)
    return n + (embedding.numel() if head is not None and head.weight is embedding else 0)


def run_model_name(record: Dict) -> str:
    """The model of a bench JSON record: its preset (with the depth when a slice), else depth x width."""
    preset = record.get("model")
    if preset in PRESETS:
        layers = record.get("layers", PRESETS[preset].layers)
        return preset if layers == PRESETS[preset].layers else f"{preset}, {layers} layers"
    return f"{record['layers']} layers x {record['hidden']}"
