"""Packed documents: each token attends only to tokens of its own document (document masking).

A packed sequence of ``S`` tokens holds documents ``[cu_seqlens[d], cu_seqlens[d + 1])`` (global positions,
the same boundaries for every batch row). The distributed schedules keep their blocks (zigzag ring steps,
FPDT chunk pairs) and their transfers; only the local kernel calls change. The rows of every block are
runs of ascending global positions, so the rows of one document form one contiguous range of the block's
rows, on both the query and the key side. A block then splits into one kernel call per document present on
both sides, on contiguous row ranges: the same diagonal causal call (the block's query and key positions
are identical) or fully visible call the block was, restricted to one document. Query rows that see no key
of a block get ``out = 0`` and ``lse = -inf``, which the log-sum-exp merge leaves out.

The shared documents' rows go to the kernel's varlen pair (:meth:`~ds_longctx.kernels.base.Kernel.forward_varlen`):
FlashAttention-4 runs all of a block's documents in one launch; other kernels run one call per document,
so there documents of a few thousand tokens or more keep the kernel's rate while many short documents pay a
launch each.
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .checks import AttentionInputError

# (first global position, length) of each run of consecutive positions, in the block's row order.
Runs = Tuple[Tuple[int, int], ...]


def slice_runs(runs: Runs, sl: slice) -> Runs:
    """The runs of rows ``sl`` (a step-1 slice) of a block whose rows are ``runs``."""
    total = sum(n for _, n in runs)
    start, stop, step = sl.indices(total)
    if step != 1:
        raise ValueError("row slices of a block have step 1")
    out, off = [], 0
    for p, n in runs:
        a, b = max(start, off), min(stop, off + n)
        if a < b:
            out.append((p + a - off, b - a))
        off += n
    return tuple(out)


class Documents:
    """Global document boundaries ``cu_seqlens`` (``0 = c_0 < c_1 < ... < c_n = S``) of a packed sequence."""

    def __init__(self, cu_seqlens: Sequence[int]):
        self.bounds = tuple(int(c) for c in cu_seqlens)

    @classmethod
    def of(cls, cu_seqlens, seq_len: int) -> "Documents":
        """Validated boundaries from a list, tuple, 1-D integer tensor or :class:`Documents`, for a global
        sequence of ``seq_len`` tokens. Raises :class:`~ds_longctx.attention.checks.AttentionInputError`."""
        if isinstance(cu_seqlens, Documents):
            docs = cu_seqlens
        else:
            if isinstance(cu_seqlens, torch.Tensor):
                if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
                    raise AttentionInputError(
                        f"cu_seqlens must be a 1-D integer tensor of document boundaries, got "
                        f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
                values = cu_seqlens.tolist()
            else:
                values = list(cu_seqlens)
            if any(isinstance(c, bool) or not isinstance(c, int) for c in values):
                raise AttentionInputError(f"cu_seqlens must hold integers, got {values[:8]}")
            docs = cls(values)
        b = docs.bounds
        if len(b) < 2 or b[0] != 0 or b[-1] != seq_len:
            raise AttentionInputError(
                f"cu_seqlens must run from 0 to the global sequence length {seq_len} (the cumulative lengths of "
                f"the packed documents, e.g. [0, {seq_len}] for one document), got {_show(b)}")
        bad = next((i for i in range(1, len(b)) if b[i] <= b[i - 1]), None)
        if bad is not None:
            raise AttentionInputError(f"cu_seqlens must increase strictly (documents are not empty): entry {bad} is "
                                      f"{b[bad]} after {b[bad - 1]}")
        return docs

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def spans(self, runs: Runs) -> Dict[int, Tuple[int, int]]:
        """Document -> the contiguous range ``(start, end)`` of rows that hold it, for a block of ``runs``."""
        spans: Dict[int, Tuple[int, int]] = {}
        b, off = self.bounds, 0
        for p, n in runs:
            d = bisect.bisect_right(b, p) - 1
            while d < len(b) - 1 and b[d] < p + n:
                lo, hi = max(p, b[d]), min(p + n, b[d + 1])
                rows = (off + lo - p, off + hi - p)
                if d in spans:
                    if spans[d][1] != rows[0]:  # pragma: no cover - the layouts keep positions ascending
                        raise RuntimeError(f"rows of document {d} are not contiguous in the block")
                    rows = (spans[d][0], rows[1])
                spans[d] = rows
                d += 1
            off += n
        return spans

    def pieces(self, q_runs: Runs, k_runs: Runs, causal: bool) -> Optional[List[Tuple[slice, slice]]]:
        """Row ranges ``(q rows, k rows)`` of the block's kernel calls, one per shared document; None when one
        document holds every row of both sides (the block's own single call). A causal block is a diagonal
        block: its query and key positions are identical."""
        if causal and q_runs != k_runs:  # pragma: no cover - guarded by the schedules
            raise RuntimeError("a causal block of a packed sequence must be diagonal")
        qs, ks = self.spans(q_runs), self.spans(k_runs)
        if len(qs) == 1 and qs.keys() == ks.keys():
            return None
        return [(slice(*qs[d]), slice(*ks[d])) for d in sorted(qs) if d in ks]

    def forward(self, kernel, q, k, v, q_runs: Runs, k_runs: Runs, causal: bool, scale: float):
        """The kernel's ``(out, lse)`` for the block restricted to documents; rows with no key: 0 and -inf."""
        parts = self.pieces(q_runs, k_runs, causal)
        if parts is None:
            return kernel.forward(q, k, v, causal, scale)
        B, Sq, H, _ = q.shape
        out = torch.zeros_like(q)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.full((B, H, Sq), float("-inf"), dtype=acc, device=q.device)
        if not parts:
            return out, lse
        qs, ks = [p[0] for p in parts], [p[1] for p in parts]
        cu_q, cu_k = _offsets(qs), _offsets(ks)
        o, l_ = kernel.forward_varlen(_take(q, qs, 1), _take(k, ks, 1), _take(v, ks, 1), cu_q, cu_k, causal, scale)
        _put(out, o, qs, cu_q, 1)
        _put(lse, l_, qs, cu_q, 2)
        return out, lse

    def backward(self, kernel, dout, q, k, v, out, lse, q_runs: Runs, k_runs: Runs, causal: bool, scale: float):
        """The kernel's ``(dq, dk, dv)`` for the block restricted to documents (each row in at most one call)."""
        parts = self.pieces(q_runs, k_runs, causal)
        if parts is None:
            return kernel.backward(dout, q, k, v, out, lse, causal, scale)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if not parts:
            return dq, dk, dv
        qs, ks = [p[0] for p in parts], [p[1] for p in parts]
        cu_q, cu_k = _offsets(qs), _offsets(ks)
        g_q, g_k, g_v = kernel.backward_varlen(_take(dout, qs, 1), _take(q, qs, 1), _take(k, ks, 1), _take(v, ks, 1),
                                               _take(out, qs, 1), _take(lse, qs, 2), cu_q, cu_k, causal, scale)
        _put(dq, g_q, qs, cu_q, 1)
        _put(dk, g_k, ks, cu_k, 1)
        _put(dv, g_v, ks, cu_k, 1)
        return dq, dk, dv

    def __eq__(self, other) -> bool:
        return isinstance(other, Documents) and other.bounds == self.bounds

    def __hash__(self) -> int:
        return hash(self.bounds)

    def __repr__(self) -> str:
        return f"Documents({self.count} documents, {self.bounds[-1]} tokens)"


def _show(bounds: Sequence[int]) -> str:
    shown = ", ".join(map(str, bounds[:4])) + (f", ..., {bounds[-1]}" if len(bounds) > 4 else "")
    return f"[{shown}]"


def _offsets(slices: Sequence[slice]) -> List[int]:
    cu = [0]
    for sl in slices:
        cu.append(cu[-1] + sl.stop - sl.start)
    return cu


def _adjacent(slices: Sequence[slice]) -> bool:
    return all(a.stop == b.start for a, b in zip(slices, slices[1:]))


def _take(x: torch.Tensor, slices: Sequence[slice], dim: int) -> torch.Tensor:
    """The rows ``slices`` of ``x`` along ``dim``, in order: a view when they are adjacent, else a copy (the
    documents a block shares can skip rows of documents only one side holds)."""
    if _adjacent(slices):
        return x.narrow(dim, slices[0].start, slices[-1].stop - slices[0].start)
    return torch.cat([x.narrow(dim, sl.start, sl.stop - sl.start) for sl in slices], dim=dim)


def _put(dst: torch.Tensor, src: torch.Tensor, slices: Sequence[slice], cu: Sequence[int], dim: int) -> None:
    """Inverse of :func:`_take`: segment ``i`` of ``src`` (``cu`` offsets) into rows ``slices[i]`` of ``dst``."""
    if _adjacent(slices):
        dst.narrow(dim, slices[0].start, cu[-1]).copy_(src)
        return
    for sl, a in zip(slices, cu):
        dst.narrow(dim, sl.start, sl.stop - sl.start).copy_(src.narrow(dim, a, sl.stop - sl.start))


def block_forward(kernel, docs: Optional[Documents], q, k, v, *, q_runs: Runs, k_runs: Runs, causal: bool,
                  scale: float):
    """``kernel.forward`` of one block, split by documents when the sequence is packed."""
    if docs is None:
        return kernel.forward(q, k, v, causal, scale)
    return docs.forward(kernel, q, k, v, q_runs, k_runs, causal, scale)


def block_backward(kernel, docs: Optional[Documents], dout, q, k, v, out, lse, *, q_runs: Runs, k_runs: Runs,
                   causal: bool, scale: float):
    """``kernel.backward`` of one block, split by documents when the sequence is packed."""
    if docs is None:
        return kernel.backward(dout, q, k, v, out, lse, causal, scale)
    return docs.backward(kernel, dout, q, k, v, out, lse, q_runs, k_runs, causal, scale)


__all__ = ["Documents", "Runs", "block_backward", "block_forward", "slice_runs"]
