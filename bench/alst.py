"""DeepSpeed's own long-sequence recipe, ALST (Arctic Long Sequence Training, arXiv 2506.13996), applied to a
transformers Llama model the way its authors' trainer (snowflakedb/ArcticTraining) applies it: the baseline
of ``bench_train.py --mode alst``.

- transformers' gradient checkpointing of every decoder layer (the bench enables it);
- each checkpointed layer's input in host memory until backward. ArcticTraining patches torch's checkpoint to
  copy its first argument (the hidden states) to the CPU; here torch's ``save_on_cpu(pin_memory=True)`` wraps
  each checkpointed call, which moves that same tensor (the checkpoint saves its positional inputs, and the
  layer gets everything else as keywords) into pinned memory. ``HostLedger`` counts the bytes;
- DeepSpeed's ``TiledMLP`` in every MLP, ``ceil(S_local / hidden)`` tiles, the largest count over the ranks
  (its docstring's and ArcticTraining's rule);
- DeepSpeed's ``TiledFusedLogitsLoss`` for the LM head and cross-entropy, tiles of about 1 GiB of fp32 logits
  (ArcticTraining's rule). The tiled function computes the gradients inside its forward for an incoming
  gradient of 1, so its output must be the loss itself: ArcticTraining sums the tiles and divides by the
  labelled-token count afterwards, which scales the LM head's gradient (only that one) by that count. Here
  each tile returns its cross-entropy sum over the sequence's labelled-token count;
- ``UlyssesSPAttentionHF`` over all ranks when there is more than one; one rank holds the whole sequence and
  needs no exchange.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import weakref
from typing import Dict, Optional

import torch
import torch.distributed as dist
from transformers.utils import ModelOutput

IGNORE = -100


class HostLedger:
    """Bytes of host memory that the offloaded checkpoints hold: now (``held``) and at most since the last
    ``reset_peak`` (``peak``). A copy is counted from its creation until autograd releases it."""

    def __init__(self):
        self.held = 0
        self.peak = 0

    def hold(self, packed: torch.Tensor) -> None:
        n = packed.untyped_storage().nbytes()
        self.held += n
        self.peak = max(self.peak, self.held)
        weakref.finalize(packed, self._release, n)

    def _release(self, n: int) -> None:
        self.held -= n

    def reset_peak(self) -> None:
        self.peak = self.held


class CountedSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
    """torch's ``save_on_cpu(pin_memory=True)`` (pinned copies, back to the device in backward), with every
    copy counted in ``ledger``."""

    def __init__(self, ledger: HostLedger):
        inner = torch.autograd.graph.save_on_cpu(pin_memory=True)

        def pack(tensor):
            device, packed = inner.pack_hook(tensor)
            ledger.hold(packed)
            return device, packed

        super().__init__(pack, inner.unpack_hook)


def _offloaded(checkpoint_fn, ledger: HostLedger):
    @functools.wraps(checkpoint_fn)
    def run(*args, **kwargs):
        with CountedSaveOnCpu(ledger):
            return checkpoint_fn(*args, **kwargs)
    return run


def offload_checkpoints(model: torch.nn.Module, ledger: HostLedger) -> int:
    """Keep what each checkpointed decoder layer saves (its input ``[B, S_local, hidden]``) in pinned host
    memory. Call after ``model.gradient_checkpointing_enable()``; returns the number of layers changed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer._gradient_checkpointing_func = _offloaded(layer._gradient_checkpointing_func, ledger)
    return len(layers)


def _mlp(mlp, x):
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def mlp_tiles(seq_local: int, hidden: int) -> int:
    """TiledMLP's tile count for ``seq_local`` tokens of width ``hidden``, agreed over the ranks (the max):
    a rank running fewer tiles would stop gathering ZeRO-3's weights before the others."""
    tiles = math.ceil(seq_local / hidden)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(tiles, device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        tiles = int(t.item())
    return tiles


def _tiled_mlp_forward(mlp, x):
    weights = [mlp.down_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight]
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    return TiledMLP.apply(_mlp, mlp, x, mlp_tiles(x.shape[-2], x.shape[-1]), weights)


def tile_mlps(model: torch.nn.Module) -> int:
    """Run every gated MLP (``down(act(gate(x)) * up(x))``) of ``model`` through DeepSpeed's ``TiledMLP``.
    Returns the number of MLPs changed."""
    mlps = [m for m in model.modules() if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    for m in mlps:
        m.forward = types.MethodType(_tiled_mlp_forward, m)
    return len(mlps)


def loss_tiles(tokens: int, vocab: int, tile_gib: float) -> int:
    """Tiles of TiledFusedLogitsLoss: about ``tile_gib`` GiB of fp32 logits each (ArcticTraining: 1)."""
    return max(1, math.ceil(tokens * vocab * 4 / 2 ** 30 / tile_gib))


@dataclasses.dataclass
class AlstOutput(ModelOutput):
    """What the patched model returns: ``loss``, this rank's part of the sequence's loss scaled for backward
    (0-dim), and ``mean_loss``, the sequence's mean cross-entropy (0-dim, detached, the same on every rank)."""

    loss: Optional[torch.Tensor] = None
    mean_loss: Optional[torch.Tensor] = None


def _tiled_loss_forward(model, input_ids, position_ids, shift_labels, *, sp_group, tile_gib):
    """``input_ids``, ``position_ids``, ``shift_labels``: ``[1, S_local]``, this rank's slice of the sequence."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    hidden = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    labelled = (shift_labels != IGNORE).sum()
    sp = 1 if sp_group is None else dist.get_world_size(sp_group)
    if sp > 1:
        dist.all_reduce(labelled, group=sp_group)
    # ZeRO averages the gradients of the sequence's ranks, whose parts of the loss add up: each part is
    # scaled by their number, and the tile function returns it whole (see the module's docstring).
    items = labelled.clamp(min=1).float() / sp

    def tile_part(m, x, y):  # x [n, hidden], y [n]; in fp32 at least, as transformers' causal-LM loss
        logits = m.lm_head(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum") / items

    tiles = loss_tiles(shift_labels.numel(), model.config.vocab_size, tile_gib)
    head = model.lm_head.weight
    # A tied head's weight also gets the embedding's gradient, later, in backward: ZeRO-3 reduces a gradient
    # once per step, so the tiles' part waits in .grad until then instead of being reduced after the last tile.
    tied = head is model.get_input_embeddings().weight
    if tied:
        head.ds_grad_is_ready = False
    loss = TiledFusedLogitsLoss.apply(tile_part, model, hidden, shift_labels, None, tiles, [] if tied else [head],
                                      "sum")
    if tied:
        head.ds_grad_is_ready = True
    mean = loss.detach().clone()
    if sp > 1:
        dist.all_reduce(mean, group=sp_group)
    return AlstOutput(loss=loss, mean_loss=mean / sp)


def tile_loss(model: torch.nn.Module, sp_group=None, tile_gib: float = 1.0) -> None:
    """Make ``model`` (a transformers ``...ForCausalLM``) return ``AlstOutput`` from
    ``model(input_ids=, position_ids=, shift_labels=)``: the decoder, then the LM head and cross-entropy tile by
    tile through ``TiledFusedLogitsLoss``; no logits are kept. ``sp_group``: the ranks sharing the sequence."""
    model.forward = functools.partial(_tiled_loss_forward, model, sp_group=sp_group, tile_gib=tile_gib)


def register_ulysses(model: torch.nn.Module, world: int, seq_len: int):
    """DeepSpeed's Ulysses attention over all ``world`` ranks for ``model`` (SDPA attention). Returns the
    ``mpu`` to give ``deepspeed.initialize``, or None for one rank (nothing to exchange)."""
    if world == 1:
        return None
    import transformers.masking_utils
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=world,
        micro_batch_size=1, seq_length=seq_len, seq_length_is_variable=True)
    # As ArcticTraining: no mask from the local slice's positions; the attention is causal over the gathered
    # sequence (is_causal).
    transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", lambda *args, **kwargs: None)
    return mpu


def shard_sequence(input_ids: torch.Tensor, rank: int, world: int) -> Dict[str, torch.Tensor]:
    """This rank's contiguous slice of a ``[1, S]`` sequence as UlyssesSPDataLoaderAdapter cuts it:
    ``input_ids``, ``position_ids`` (global) and ``shift_labels`` (the next token, -100 after the last),
    each ``[1, S / world]``."""
    S = input_ids.shape[1]
    if S % world:
        raise ValueError(f"sequence length {S} is not divisible by the {world} ranks")
    n = S // world
    labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=IGNORE)
    pos = torch.arange(S).unsqueeze(0)
    cut = slice(rank * n, (rank + 1) * n)
    return {"input_ids": input_ids[:, cut], "position_ids": pos[:, cut], "shift_labels": labels[:, cut]}


def sequence_group(mpu) -> Optional[object]:
    """The process group of the ranks sharing one sequence (None without Ulysses)."""
    return None if mpu is None else mpu.get_sequence_parallel_group()
