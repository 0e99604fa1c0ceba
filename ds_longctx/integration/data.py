"""Put each batch in the load-balanced (zigzag) layout: input_ids, labels and position_ids.

Labels are shifted *before* sharding: in the zigzag layout the token after a rank's last token usually
lives on another rank, so shifting a shard would pair tokens with the wrong targets. Position ids are the
global positions of the rank's tokens, so RoPE sees the same positions as on a single device.

Packed documents (several sequences in one row, as transformers' ``DataCollatorWithFlattening`` makes them:
``position_ids`` restart at 0 for each document, optionally with ``cu_seq_lens_q``): the document boundaries
of the full sequence go into the sharded batch as ``cu_seq_lens_q``, and the model's attention keeps every
token inside its document, as transformers does on one device for such position ids.

Every rank of a sequence-parallel group must receive the same full batch (e.g. the dataloader's sampler
is split over the data-parallel ranks only; the mpu that :func:`ds_longctx.initialize` gives DeepSpeed
does that for DeepSpeed's own dataloader).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from ..attention.checks import AttentionInputError
from ..attention.documents import Documents
from ..layout import LayoutError, ZigzagLayout, positions, shard
from ..topology import Topology
from .batch_checks import agree_on_batch, fingerprint, value_problem

IGNORE_INDEX = -100


class BatchError(ValueError):
    """A batch that cannot be put in the layout; raised on every rank alike, with what to change."""


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets: ``out[:, t] = labels[:, t + 1]``, ``out[:, -1] = ignore_index``. ``[B, S] -> [B, S]``."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def packed_boundaries(position_ids: torch.Tensor) -> Optional[List[int]]:
    """Document boundaries ``[0, ..., S]`` of position ids ``[1 or B, S]`` that restart (transformers' rule: a
    document starts wherever a position is not its predecessor + 1), None for one document per row.
    Raises ValueError when rows are packed differently (the boundaries hold for every row)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if bool((starts != starts[:1]).any()):
        raise ValueError("the rows of position_ids are packed with different document boundaries; the distributed "
                         "attention takes one packing for the whole batch: use one packed row per micro-batch "
                         "(DataCollatorWithFlattening makes such rows) or the same boundaries in every row")
    cuts = starts[0].nonzero().flatten().tolist()
    if len(cuts) == 1:
        return None
    return cuts + [position_ids.shape[1]]


def _boundaries(batch: Mapping[str, Any], S: int) -> Tuple[Optional[List[int]], Optional[str]]:
    """The batch's document boundaries (from ``cu_seq_lens_q``/``_k`` or restarting ``position_ids``) and what
    is wrong with them, if anything."""
    given = []
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        cu = batch.get(key)
        if cu is None:
            continue
        try:
            given.append((key, list(Documents.of(cu, S).bounds)))
        except AttentionInputError as exc:
            return None, f"{key}: {exc}"
    try:
        pos = batch.get("position_ids")
        derived = packed_boundaries(pos) if torch.is_tensor(pos) else None
    except ValueError as exc:
        return None, str(exc)
    for key, cu in given:
        if derived is not None and cu != derived:
            return None, (f"{key} {cu[:6]}... disagrees with the documents where position_ids restart "
                          f"{derived[:6]}...; pass the boundaries of the position ids' documents")
    if given and given[0][1] != given[-1][1]:
        return None, "cu_seq_lens_q and cu_seq_lens_k differ: the attention is self-attention over one packing"
    cu = given[0][1] if given else derived
    return (cu if cu is not None and len(cu) > 2 else None), None


def sequence_multiple(topo: Topology, chunk_size: Optional[int] = None) -> int:
    """The full sequence length of a batch must be a multiple of this for ``topo`` (and FPDT chunks of
    ``chunk_size`` tokens of the group sequence)."""
    m = ZigzagLayout.of(topo).multiple
    if chunk_size is not None:
        m = math.lcm(m, topo.ring * chunk_size)
    return m


def _problem(batch: Mapping[str, Any], topo: Topology, chunk_size: Optional[int]) -> Optional[str]:
    """What is wrong with this rank's full batch, or ``None``; reads only local data (no collective)."""
    if "input_ids" in batch:
        ref_key = "input_ids"
    elif "inputs_embeds" in batch:
        ref_key = "inputs_embeds"
    else:
        return f"the batch needs input_ids (or inputs_embeds); it has keys {sorted(batch)}"
    ref = batch[ref_key]
    if not torch.is_tensor(ref) or ref.dim() < 2:
        return f"{ref_key} must be a [batch, seq, ...] tensor, got {type(ref).__name__} " \
               f"{tuple(ref.shape) if torch.is_tensor(ref) else ''}"
    B, S = ref.shape[0], ref.shape[1]
    m = sequence_multiple(topo, chunk_size)
    if S % m != 0:
        chunks = f" with fpdt.chunk_size={chunk_size}" if chunk_size is not None else ""
        return (f"sequence length {S} is not divisible by {m}, which ulysses_degree={topo.ulysses} x "
                f"ring_degree={topo.ring}{chunks} needs; pad sequences to a multiple of {m} (e.g. "
                f"{-(-S // m) * m}, with labels -100 on the padding) or change the degrees")
    try:
        ZigzagLayout.of(topo, chunk_size).check(S)
    except LayoutError as exc:
        return str(exc)
    for key in ("labels", "shift_labels", "attention_mask"):
        t = batch.get(key)
        if t is not None and (not torch.is_tensor(t) or tuple(t.shape) != (B, S)):
            return f"{key} must be a [{B}, {S}] tensor like {ref_key}, got " \
                   f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}"
    if batch.get("labels") is not None and batch.get("shift_labels") is not None:
        return "pass either labels (shifted here) or shift_labels (already shifted), not both"
    pos = batch.get("position_ids")
    if pos is not None and (not torch.is_tensor(pos) or pos.dim() != 2 or pos.shape[1] != S
                            or pos.shape[0] not in (1, B)):
        return f"position_ids must be [1 or {B}, {S}], got " \
               f"{tuple(pos.shape) if torch.is_tensor(pos) else type(pos).__name__}"
    mask = batch.get("attention_mask")
    if mask is not None and not bool((mask != 0).all()):
        return ("attention_mask has padding zeros, which the distributed attention cannot apply; pad on the "
                "right and set labels to -100 on the padding (causal attention never lets a real token see "
                "right padding), then drop attention_mask")
    return None


def shard_batch(batch: Mapping[str, Any], topo: Topology, ignore_index: int = IGNORE_INDEX,
                chunk_size: Optional[int] = None, vocab_size: Optional[int] = None,
                length_problem: Optional[Callable[[int], Optional[str]]] = None) -> Dict[str, Any]:
    """This rank's part of a full batch, in the zigzag layout. Collective over the world (one tiny all-reduce
    that makes a bad batch on any rank, or ranks of a sequence-parallel group holding different batches,
    raise on every rank).

    Input (the same on every rank of a sequence-parallel group):
        ``input_ids`` ``[B, S]`` (or ``inputs_embeds`` ``[B, S, E]``);
        optional ``labels`` ``[B, S]`` (unshifted, as for ``*ForCausalLM``) or ``shift_labels`` ``[B, S]``;
        optional ``position_ids`` ``[1 or B, S]`` (default ``arange(S)``);
        optional ``attention_mask`` ``[B, S]``, which must be all ones (it is dropped: attention is causal);
        other tensors with the sequence at dim 1 are sharded, anything else passes through.

    Returns:
        the same keys with ``S_local = S / (U * R)`` tokens, ``labels`` replaced by ``shift_labels``
        (``[B, S_local]``, targets already aligned with this rank's tokens, ``ignore_index`` where none), and
        ``position_ids`` ``[1 or B, S_local]`` holding global positions. Feed ``input_ids`` and
        ``position_ids`` to the model and ``shift_labels`` to :func:`ds_longctx.integration.loss.causal_lm_loss`.
        A packed batch (``position_ids`` that restart at 0 per document, or ``cu_seq_lens_q``) also gets
        ``cu_seq_lens_q``: the documents' boundaries in the full sequence (int32 ``[n_docs + 1]``), which the
        model passes to the attention when it is called with ``**batch`` (or ``cu_seq_lens_q=...``).

    ``chunk_size``: the block's ``fpdt.chunk_size``; FPDT chunking takes its own (chunked) layout.
    ``vocab_size``: token ids and labels outside ``[0, vocab_size)`` (labels may be ``ignore_index``) raise.
    Position ids must count up by one and restart only at 0 (packed documents).
    ``length_problem``: a further check of the global sequence length ``S`` (the engine's pre-flight memory
    check of a longer batch), whose problem is raised on every rank like the batch's own.
    """
    problem, cu = _problem(batch, topo, chunk_size), None
    if problem is None and length_problem is not None:
        problem = length_problem(batch["input_ids" if "input_ids" in batch else "inputs_embeds"].shape[1])
    if problem is None:  # the shapes are right: read the values and the packing
        problem = value_problem(batch, vocab_size, ignore_index)
    if problem is None:
        cu, problem = _boundaries(batch, batch["input_ids" if "input_ids" in batch else "inputs_embeds"].shape[1])
    agree_on_batch(problem, fingerprint(batch) if problem is None else None, topo, BatchError)
    ref = batch["input_ids"] if "input_ids" in batch else batch["inputs_embeds"]
    B, S = ref.shape[0], ref.shape[1]
    out: Dict[str, Any] = {}
    for key, value in batch.items():
        if key in ("attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            continue  # masks: all ones (checked); documents: replaced by the boundaries below
        if key == "labels":
            out["shift_labels"] = shard(shift_labels(value, ignore_index), topo, dim=1, chunk_size=chunk_size)
        elif torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == S and value.shape[0] in (1, B):
            out[key] = shard(value, topo, dim=1, chunk_size=chunk_size)
        else:
            out[key] = value
    if out.get("position_ids") is None:
        out["position_ids"] = positions(S, topo, device=ref.device, chunk_size=chunk_size).unsqueeze(0)
    if cu is not None:
        out["cu_seq_lens_q"] = torch.tensor(cu, dtype=torch.int32, device=ref.device)
    return out


class ShardedLoader:
    """Wrap any iterable of full batches (e.g. a ``DataLoader``) to yield :func:`shard_batch` of each.

    ``len()`` is the wrapped loader's. Every rank of a sequence-parallel group must iterate over the same
    batches (shard the sampler over data-parallel ranks only: ``num_replicas=topo.dp, rank=topo.dp_rank``).
    """

    def __init__(self, loader: Iterable[Mapping[str, Any]], topo: Topology, ignore_index: int = IGNORE_INDEX,
                 chunk_size: Optional[int] = None, vocab_size: Optional[int] = None):
        self.loader = loader
        self.topo = topo
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for batch in self.loader:
            yield shard_batch(batch, self.topo, self.ignore_index, chunk_size=self.chunk_size,
                              vocab_size=self.vocab_size)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


__all__ = ["BatchError", "IGNORE_INDEX", "ShardedLoader", "sequence_multiple", "shard_batch", "shift_labels"]
