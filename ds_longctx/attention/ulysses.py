"""Ulysses head plan: which query and kv heads each rank of a Ulysses group computes.

Query heads are split into contiguous ranges, unevenly when ``H % U != 0``. Each rank receives the kv heads
its query heads read: with ``Hkv`` a multiple of ``U`` and aligned ranges this is a clean split; with fewer
kv heads than ranks, or ranges that cut a GQA group, a kv head goes to every rank that needs it (replicated
on the wire only to those ranks, still with ``Hkv``-sized K/V, never expanded to ``H`` heads).
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..comm.all_to_all import split_heads
from ..kernels.base import Kernel, MappedKVKernel


class UlyssesPlan:
    """Head ranges for ``n_heads`` query and ``n_kv_heads`` kv heads over a Ulysses group of ``degree``."""

    def __init__(self, n_heads: int, n_kv_heads: int, degree: int, rank: int):
        self.n_heads, self.n_kv_heads, self.degree, self.rank = n_heads, n_kv_heads, degree, rank
        group = n_heads // n_kv_heads
        self.q_ranges: List[Tuple[int, int]] = split_heads(n_heads, degree)
        self.kv_ranges: List[Tuple[int, int]] = [(a // group, (b - 1) // group + 1) for a, b in self.q_ranges]
        qa, qb = self.q_ranges[rank]
        ka, _ = self.kv_ranges[rank]
        # Local query head i reads local kv head kv_map[i].
        self.kv_map = [(h // group) - ka for h in range(qa, qb)]

    def local_kernel(self, kernel: Kernel) -> Kernel:
        """``kernel`` itself when the local head map is a uniform GQA ratio, else a kv-gathering wrapper."""
        counts = torch.bincount(torch.tensor(self.kv_map))
        if bool((counts == counts[0]).all()):
            return kernel
        return MappedKVKernel(kernel, torch.tensor(self.kv_map))


class HeadChunk:
    """One slice of the heads that the pipelined schedule sends and computes at once: per-rank query and
    kv head ranges (for the all-to-all) and the kernel for the local heads."""

    def __init__(self, q_ranges, kv_ranges, kernel):
        self.q_ranges, self.kv_ranges, self.kernel = q_ranges, kv_ranges, kernel


def head_chunks(plan: UlyssesPlan, kernel: Kernel, n_chunks: int) -> List[HeadChunk]:
    """Split the Ulysses heads into up to ``n_chunks`` chunks of whole GQA groups, so that the all-to-all of
    chunk ``c+1`` (and the return of chunk ``c-1``) overlaps the attention of chunk ``c``.

    Only even plans split (every rank the same whole kv heads); uneven or replicated plans are one chunk.
    """
    U, H, Hkv = plan.degree, plan.n_heads, plan.n_kv_heads
    if U == 1 or H % U or Hkv % U:
        return [HeadChunk(plan.q_ranges, plan.kv_ranges, plan.local_kernel(kernel))]
    h, hk = H // U, Hkv // U
    n = max(d for d in range(1, min(n_chunks, hk) + 1) if hk % d == 0)
    qn, kn = h // n, hk // n
    return [HeadChunk([(u * h + c * qn, u * h + (c + 1) * qn) for u in range(U)],
                      [(u * hk + c * kn, u * hk + (c + 1) * kn) for u in range(U)], kernel) for c in range(n)]
