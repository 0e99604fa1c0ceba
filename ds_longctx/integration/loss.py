"""Causal-LM loss of a sequence split over the sequence-parallel group, equal to the unsharded loss.

Each rank holds some of the tokens, and ranks hold different numbers of valid targets (``-100`` marks
padding, the last token, prompt tokens...). The unsharded loss is ``sum of token losses / valid tokens``
over the whole sequence, so every rank divides its local sum by the group's valid count, not its own, and
the shares are summed over the group: every rank returns the same loss ``L`` of the whole sequence.

Gradient convention: that sum is a differentiable all-reduce with its true adjoint (each rank's share
receives the gradient of all ``U*R`` replicas of ``L``), so the gradients of the ranks of a group add up to
``U*R`` times the unsharded gradient, and averaging gradients over *all* ranks, as DeepSpeed does with the
mpu of :func:`ds_longctx.initialize` (or DDP over the world), gives the mean over data-parallel replicas of
the unsharded gradients.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from ..topology import Topology
from .data import IGNORE_INDEX


class _GroupSum(torch.autograd.Function):
    """``y = sum over the group of x``, replicated on its ranks. The adjoint of a replicated sum is again a
    sum: ``dx = sum over the group of dy`` (every rank's ``y`` depends on every rank's ``x``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        y = x.detach().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone()
        dist.all_reduce(dx, group=ctx.group)
        return dx, None


def valid_token_count(shift_labels: torch.Tensor, topo: Topology, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of targets ``!= ignore_index`` over the whole sequence-parallel group (collective). Scalar int64."""
    count = (shift_labels != ignore_index).sum().to(torch.int64)
    if topo.sp > 1:
        dist.all_reduce(count, group=topo.sp_group)
    return count


def causal_lm_loss(logits: torch.Tensor, shift_labels: torch.Tensor, topo: Topology,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy over all valid targets of the sequence-parallel group.

    Args:
        logits: ``[B, S_local, V]`` this rank's logits (any float dtype; the loss is taken in at least float32).
        shift_labels: ``[B, S_local]`` targets aligned with this rank's tokens, as returned by
            :func:`ds_longctx.integration.data.shard_batch` (labels shifted before sharding).
        topo: the :class:`~ds_longctx.topology.Topology`.

    Returns:
        scalar (float32, or float64 for float64 logits): the group's mean loss, identical on its ranks (0
        when no target is valid). Its backward is collective too; averaged over all ranks (DeepSpeed, DDP
        over the world), the ranks' gradients are the unsharded gradient (averaged over data-parallel
        replicas). Collective over the sequence-parallel group.
    """
    if logits.shape[:2] != shift_labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and shift_labels {tuple(shift_labels.shape)} must agree "
                         f"in [batch, local sequence]")
    # at least float32: a bf16 log-softmax over a large vocabulary loses the loss's low bits
    dtype = torch.promote_types(logits.dtype, torch.float32)
    local_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), shift_labels.reshape(-1),
                                ignore_index=ignore_index, reduction="sum")
    count = valid_token_count(shift_labels, topo, ignore_index)
    share = local_sum / count.clamp(min=1).to(local_sum.dtype)
    if topo.sp == 1:
        return share
    return _GroupSum.apply(share, topo.sp_group)


def _token_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int) -> torch.Tensor:
    logits = head(hidden)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


def tiled_causal_lm_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                         shift_labels: torch.Tensor, topo: Topology, tile_tokens: int,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``head(hidden)`` without ever holding the logits of the whole sequence.

    The LM head and the cross-entropy run over tiles of ``tile_tokens`` positions, each under a
    non-reentrant checkpoint: only one tile's ``[B, tile, V]`` logits (and their fp32 copy) exist at a
    time, in forward and in backward, where they are recomputed. Whole, the logits take ``S_local * V * 6``
    bytes (bf16 plus the fp32 copy of the cross-entropy): 94 GiB for 131,072 tokens and Llama 3's 128,256.

    Args:
        hidden: ``[B, S_local, hidden]`` the final hidden states (after the last norm) of this rank's tokens.
        head: the LM head (a module, called once per tile, so ZeRO-3 gathers its weight), ``[..., hidden] ->
            [..., V]``.
        shift_labels: ``[B, S_local]`` as for :func:`causal_lm_loss`.
        tile_tokens: positions per tile.

    Returns:
        the same scalar as :func:`causal_lm_loss` (collective over the sequence-parallel group).
    """
    if hidden.shape[:2] != shift_labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and shift_labels {tuple(shift_labels.shape)} must agree "
                         f"in [batch, local sequence]")
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be a positive number of tokens, got {tile_tokens}")
    parts = [torch.utils.checkpoint.checkpoint(_token_loss_sum, head, h, y, ignore_index, use_reentrant=False)
             if torch.is_grad_enabled() else _token_loss_sum(head, h, y, ignore_index)
             for h, y in zip(hidden.split(tile_tokens, dim=1), shift_labels.split(tile_tokens, dim=1))]
    local_sum = torch.stack(parts).sum()
    count = valid_token_count(shift_labels, topo, ignore_index)
    share = local_sum / count.clamp(min=1).to(local_sum.dtype)
    if topo.sp == 1:
        return share
    return _GroupSum.apply(share, topo.sp_group)


__all__ = ["causal_lm_loss", "tiled_causal_lm_loss", "valid_token_count"]
