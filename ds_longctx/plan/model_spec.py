"""The shape of a transformers causal LM, read from its config: what the planner needs and nothing else."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Union


class ModelSpecError(ValueError):
    """A model config the planner cannot read; the message names the file or the missing key."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only LM of ``layers`` identical blocks (attention + gated MLP, RMSNorms), Llama-style.

    Sizes are element counts; ``head_dim`` may differ from ``hidden / heads`` (Qwen3)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    name: str = "model"

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], Any], name: str = "model") -> "ModelSpec":
        """From a transformers ``PretrainedConfig`` or its ``config.json`` as a dict."""
        if not isinstance(config, Mapping):
            if hasattr(config, "get_text_config"):
                config = config.get_text_config()
            config = config.to_dict()
        if "text_config" in config and "hidden_size" not in config:
            config = config["text_config"]
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if not isinstance(config.get(k), int)]
        if missing:
            raise ModelSpecError(f"{name}: the model config lacks {', '.join(missing)} (a transformers causal-LM "
                                 f"config.json is expected)")
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                   intermediate=config["intermediate_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
                   vocab=config["vocab_size"], tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                   name=name)

    @classmethod
    def from_path(cls, path: Union[str, "os.PathLike[str]"]) -> "ModelSpec":
        """From a ``config.json`` file or a folder holding one (a downloaded model's folder)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ModelSpecError(f"--model {path}: no such file" + (" (the folder holds no config.json)"
                                                                   if os.path.isdir(path) else ""))
        try:
            with open(file) as f:
                config = json.load(f)
        except ValueError as exc:
            raise ModelSpecError(f"{file}: not valid JSON: {exc}") from None
        if not isinstance(config, Mapping):
            raise ModelSpecError(f"{file}: a JSON object is expected")
        name = config.get("_name_or_path") or os.path.basename(os.path.dirname(os.path.abspath(file))) or "model"
        return cls.from_config(config, name=str(name))

    # ---- parameter counts (elements); cached: the planner reads them at every candidate it judges ------

    @functools.cached_property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @functools.cached_property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @functools.cached_property
    def layer_params(self) -> int:
        attention = self.hidden * (self.q_width + 2 * self.kv_width) + self.q_width * self.hidden
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """LM head weights that are not the input embedding's."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @functools.cached_property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.head_params + self.hidden

    @functools.cached_property
    def matmul_params(self) -> int:
        """Weights used in matrix products per token (the LM head counts, the input lookup does not)."""
        return self.layers * (self.layer_params - 2 * self.hidden) + self.vocab * self.hidden

    def flops_per_step(self, seq_len: int, recomputed_layers: int = 0, attention_recomputed_layers: int = 0) -> dict:
        """Model FLOPs of one sequence's forward and backward: ``{"matmul": ..., "attention": ...}``.

        Causal attention: forward ``2 * 2 * S^2 / 2 * heads * head_dim`` per layer, backward 2.5x that.
        ``recomputed_layers`` layers run their matrix products once more in backward (checkpointing), of them
        ``attention_recomputed_layers`` their attention too (the others keep its output)."""
        matmul = 6 * self.matmul_params * seq_len
        matmul += 2 * recomputed_layers * (self.layer_params - 2 * self.hidden) * seq_len
        attention_fwd = 2.0 * seq_len * seq_len * self.q_width  # one layer's: causal half of 4 S^2 H D
        attention = attention_fwd * (3.5 * self.layers + min(recomputed_layers, attention_recomputed_layers))
        return {"matmul": float(matmul), "attention": attention}


__all__ = ["ModelSpec", "ModelSpecError"]
