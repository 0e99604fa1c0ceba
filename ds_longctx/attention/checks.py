"""Input checks of the distributed attention, run before any collective.

They read only what every rank of a well-formed call shares (shapes, dtypes, the topology), so a bad call
fails on every rank alike instead of leaving some ranks waiting in a collective.
"""
from __future__ import annotations

import torch

from ..layout import ZigzagLayout


class AttentionInputError(ValueError):
    """Inputs the distributed attention cannot take; the message says what to change."""


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topo, chunk_size, offload) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise AttentionInputError(f"{name} must be [B, S_local, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise AttentionInputError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise AttentionInputError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, local sequence and head_dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.is_floating_point():
        raise AttentionInputError(f"attention takes floating-point inputs, got {q.dtype}")
    H, Hkv = q.shape[2], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise AttentionInputError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    if H < topo.ulysses:
        raise AttentionInputError(
            f"ulysses degree {topo.ulysses} exceeds the {H} query heads: lower ulysses_degree to at most {H} "
            f"and raise ring_degree instead (the ring is not limited by heads)")
    S_local = q.shape[1]
    layout = ZigzagLayout.of(topo)
    seq_len = S_local * topo.sp
    if S_local == 0:
        raise AttentionInputError("the local sequence is empty")
    layout.check(seq_len, what=f"global sequence length (S_local {S_local} x sp {topo.sp})")
    if offload and chunk_size is None:
        raise AttentionInputError("offload=True needs chunk_size (offload moves K/V of finished chunks)")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise AttentionInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        check_chunk_size(chunk_size, S_local, topo)


def valid_chunk_sizes(S_local: int, topo) -> list:
    """Chunk sizes the chunked layout accepts for this local length: multiples of ``ulysses`` that divide the
    group sequence ``L = S_local * ulysses``."""
    U = topo.ulysses
    L = S_local * U
    return [C for C in range(U, L + 1, U) if L % C == 0]


def check_chunk_size(chunk_size: int, S_local: int, topo) -> None:
    """``chunk_size`` (tokens of the group sequence per chunk) must split the group sequence evenly and each
    chunk evenly over the Ulysses ranks; the message names the nearest sizes that do."""
    U = topo.ulysses
    L = S_local * U
    if chunk_size % U == 0 and L % chunk_size == 0:
        return
    ok = valid_chunk_sizes(S_local, topo)
    below = [C for C in ok if C < chunk_size]
    above = [C for C in ok if C > chunk_size]
    near = ([below[-1]] if below else []) + ([above[0]] if above else [])
    why = (f"is not a multiple of ulysses={U} (each chunk is split evenly over the ulysses ranks)"
           if chunk_size % U else
           f"does not divide the group sequence of L = S_local {S_local} x ulysses {U} = {L} tokens")
    raise AttentionInputError(
        f"chunk_size {chunk_size} {why}; use a multiple of {U} that divides {L}, e.g. "
        f"{' or '.join(map(str, near))} (inputs must be sharded with the same chunk_size)")
