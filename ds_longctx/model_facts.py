"""What the block's checks read from a transformers model: its head counts and its decoder layers."""
from __future__ import annotations

from typing import Any, Optional, Tuple


def _text_config(model: Any) -> Any:
    """A transformers model's (text) config, ``None`` for other modules."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_head_counts(model: Any) -> Optional[Tuple[int, int]]:
    """``(num_attention_heads, num_key_value_heads)`` of a transformers model, ``None`` for other modules."""
    config = _text_config(model)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        return None
    kv = getattr(config, "num_key_value_heads", None)
    return heads, kv if isinstance(kv, int) else heads


def model_layer_count(model: Any) -> Optional[int]:
    """``num_hidden_layers`` of a transformers model (its decoder layers), ``None`` for other modules."""
    config = _text_config(model)
    layers = getattr(config, "num_hidden_layers", None)
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else None


__all__ = ["model_head_counts", "model_layer_count"]
