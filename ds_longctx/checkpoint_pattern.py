"""Which checkpointed decoder layers keep their input and their attention output from forward to backward.

One rule for the run (:mod:`ds_longctx.integration.hf_layers`) and the planner (:mod:`ds_longctx.plan`), so the
memory the planner counts is the memory the run keeps. Layers are counted from 0 among the checkpointed ones
(the first ``checkpoint_layers`` of the model), in groups of ``checkpoint_every``: the first layer of a group
keeps its input, each other one rebuilds its input in backward by rerunning the layers before it in its group.
"""
from __future__ import annotations

from typing import Union

#: ``keep_attention_output`` value: keep the outputs that reruns take, those of every checkpointed layer but
#: the last of each ``checkpoint_every`` group (and the last checkpointed layer), the only ones no rerun reads.
#: Such a layer keeps as much as the input its group no longer keeps, while each rerun of the layers before it
#: runs without its attention; the last layer of a group runs its attention once more in its own backward.
RERUNS = "reruns"

KeepAttentionOutput = Union[bool, str]


def keeps_input(layer: int, every: int) -> bool:
    """Whether checkpointed ``layer`` keeps its input (the first of each group of ``every``)."""
    return layer % every == 0


def keeps_attention_output(keep: KeepAttentionOutput, layer: int, every: int, checkpointed: int) -> bool:
    """Whether checkpointed ``layer`` (of ``checkpointed`` layers, in groups of ``every``) keeps its attention
    output under ``keep_attention_output`` ``keep`` (true, false or :data:`RERUNS`)."""
    if keep != RERUNS:
        return bool(keep)
    return (layer + 1) % every != 0 and layer + 1 < checkpointed


def attention_outputs_kept(keep: KeepAttentionOutput, first: int, end: int, every: int, checkpointed: int) -> int:
    """How many of the checkpointed layers ``first <= layer < end`` keep their attention output (what
    :func:`keeps_attention_output` says layer by layer, counted without a loop: the planner asks often)."""
    if keep != RERUNS:
        return max(0, end - first) if keep else 0
    end = min(end, checkpointed - 1)  # the last checkpointed layer keeps none
    if end <= first:
        return 0
    group_ends = end // every - first // every  # layers first <= l < end with (l + 1) % every == 0
    return end - first - group_ends


def rerun_with_attention(keep: KeepAttentionOutput) -> bool:
    """Whether a rerun that rebuilds an input runs its layer's attention: only where that layer keeps no output.
    Under :data:`RERUNS` every layer a rerun runs (one that is not the last of its group) keeps its output."""
    return keep is False


__all__ = ["KeepAttentionOutput", "RERUNS", "attention_outputs_kept", "keeps_attention_output", "keeps_input",
           "rerun_with_attention"]
