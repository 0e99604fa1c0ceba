"""The group loss of a transformers model called with ``shift_labels=``: the request the pre-hook takes out of
the call, the hidden states the base model's hook captures (tiled loss), and the forward hook that puts the
loss in ``.loss``."""
from __future__ import annotations

from typing import Optional

import torch

from .context import LongContext, long_context_of
from .hf_attention import HFModelError

_REQUEST_ATTR = "_ds_longctx_loss_request"


class LossRequest:
    """A call's ``shift_labels``, the loss tile, and (tiled) the final hidden states the base model returned."""

    def __init__(self, shift_labels: torch.Tensor, tile_tokens: Optional[int]):
        self.shift_labels, self.tile_tokens = shift_labels, tile_tokens
        self.hidden: Optional[torch.Tensor] = None


def set_request(model: torch.nn.Module, request: Optional[LossRequest]) -> None:
    object.__setattr__(model, _REQUEST_ATTR, request)
    base = getattr(model, "base_model", model)
    if base is not model:
        object.__setattr__(base, _REQUEST_ATTR, request)


def loss_request(model: torch.nn.Module, lc: LongContext, signature, arguments) -> Optional[LossRequest]:
    """The loss the call asks for with ``shift_labels=`` (taken out of ``arguments``); refuses ``labels``
    under sequence parallelism, where the model's own loss would shift labels inside each rank's shard."""
    shift_labels = arguments.pop("shift_labels", None)
    if arguments.get("labels") is not None and lc.topology.sp > 1:
        raise HFModelError("labels= makes the model shift labels inside each rank's shard and average per rank; "
                           "pass shift_labels=batch['shift_labels'] (from shard_batch) instead: the output's .loss "
                           "is then the mean over the whole sequence's valid tokens")
    if shift_labels is None:
        return None
    tile = lc.config.loss_tile_tokens
    if tile is not None:
        if "logits_to_keep" not in signature.parameters or getattr(model, "base_model", model) is model:
            raise HFModelError(f"{type(model).__name__} has no logits_to_keep argument or no base model, which "
                               f"long_context.loss_tile_tokens needs; set loss_tile_tokens to null")
        # no logits at all from the model: the loss computes them tile by tile from the final hidden states
        arguments["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=shift_labels.device)
    return LossRequest(shift_labels, tile)


def capture_hidden(base: torch.nn.Module, args, output):
    """Forward hook of the base model: keep the final hidden states for a tiled loss."""
    request = getattr(base, _REQUEST_ATTR, None)
    if request is not None and request.tile_tokens is not None:
        request.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def finish_call(model: torch.nn.Module, args, kwargs, output):
    """Forward hook: with ``shift_labels=`` in the call, put the sequence-parallel group's loss in ``.loss``."""
    request = getattr(model, _REQUEST_ATTR, None)
    if request is None:
        return None
    set_request(model, None)
    lc = long_context_of(model)
    if request.tile_tokens is not None:
        if request.hidden is None:
            raise HFModelError(f"{type(model).__name__}'s base model returned no hidden states to the loss")
        loss = lc.loss_from_hidden(request.hidden, model.get_output_embeddings(), request.shift_labels,
                                   request.tile_tokens)
    else:
        loss = lc.loss(output.logits, request.shift_labels)
    output["loss"] = loss
    return output


__all__ = ["LossRequest", "capture_hidden", "finish_call", "loss_request", "set_request"]
