"""Elementwise functions (norm tiles, the MLP's gating, the rotary embedding) as ``torch.compile``d kernels."""
from __future__ import annotations

import functools
from typing import Callable

import torch


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile``, built once per process and function: one graph (``fullgraph``), dynamic
    shapes (tiles and sequence lengths vary); the first call of each compiles it."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


__all__ = ["compiled"]
