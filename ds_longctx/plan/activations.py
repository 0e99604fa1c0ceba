"""What a decoder layer keeps for its backward, checkpointed or not (bytes per rank), and which layers are which.

Under activation checkpointing with ``checkpoint_layers`` N, the first N layers keep their input (and, with
``keep_attention_output``, the attention's output) and rebuild the rest in backward; the last ``layers - N``
keep everything their graph saves, as every layer does without checkpointing: :func:`unchecked_layer_bytes`.
Coefficients are per token and count each tensor once, in the units of the model's widths (transformers'
Llama layer, :mod:`ds_longctx.memory` and :mod:`ds_longctx.attention`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .. import checkpoint_pattern
from .model_spec import ModelSpec
from .settings import Run, Settings

BF16 = 2
FP32 = 4


def checkpointed_layers(run: Run, settings: Settings) -> int:
    """Layers recomputed in backward: the first ``checkpoint_layers`` under checkpointing, none without."""
    return settings.checkpointed(run.model.layers) if run.checkpointing else 0


def keeps_input(layer: int, settings: Settings) -> bool:
    """Whether checkpointed ``layer`` keeps its input to backward (with ``checkpoint_every`` N, the first of each
    group of N: the others rebuild theirs by rerunning the layers before them in their group)."""
    return checkpoint_pattern.keeps_input(layer, settings.checkpoint_every)


def inputs_kept(first: int, end: int, settings: Settings) -> int:
    """How many of the checkpointed layers ``first <= layer < end`` keep their input (:func:`keeps_input`)."""
    every = settings.checkpoint_every
    return max(0, -(-end // every) - -(-first // every))


def keeps_output(layer: int, run: Run, settings: Settings) -> bool:
    """Whether checkpointed ``layer`` keeps its attention output (``keep_attention_output``: true, false or
    ``"reruns"``, :func:`ds_longctx.checkpoint_pattern.keeps_attention_output`)."""
    return checkpoint_pattern.keeps_attention_output(settings.keep_attention_output, layer, settings.checkpoint_every,
                                                     checkpointed_layers(run, settings))


def outputs_kept(first: int, end: int, run: Run, settings: Settings) -> int:
    """How many of the checkpointed layers ``first <= layer < end`` keep their attention output."""
    return checkpoint_pattern.attention_outputs_kept(settings.keep_attention_output, first, end,
                                                     settings.checkpoint_every, checkpointed_layers(run, settings))


class Reruns(NamedTuple):
    """Layer forwards run once more per step to rebuild inputs (``checkpoint_every``): all of them, and those of
    layers without a kept attention output (which run their attention again)."""

    layers: int
    with_attention: int


def reruns(run: Run, settings: Settings) -> Reruns:
    """The layer at offset j of its group reruns the j layers before it (``0 + 1 + ... + (every - 1)`` per whole
    group), with their attention where they keep no output
    (:func:`ds_longctx.checkpoint_pattern.rerun_with_attention`)."""
    every, layers = settings.checkpoint_every, checkpointed_layers(run, settings)
    groups, rest = divmod(layers, every)
    total = groups * every * (every - 1) // 2 + rest * (rest - 1) // 2
    return Reruns(total, total if checkpoint_pattern.rerun_with_attention(settings.keep_attention_output) else 0)


class Widths:
    """Per-token sizes of one rank's tensors (elements), from the model and the settings."""

    def __init__(self, model: ModelSpec, settings: Settings):
        self.h, self.i, self.v = model.hidden, model.intermediate, model.vocab
        self.q, self.kv, self.heads = model.q_width, model.kv_width, model.heads
        self.d = model.head_dim
        self.kv_heads_per_rank = max(1, math.ceil(model.kv_heads / settings.ulysses))
        self.heads_per_rank = max(1, model.heads // settings.ulysses)


def kept_bytes(tokens: int, w: Widths) -> int:
    """One layer's kept attention output and its fp32 log-sum-exp."""
    return tokens * (BF16 * w.q + FP32 * w.heads)


def attention_state(settings: Settings, w: Widths, tokens: int) -> int:
    """q, k, v (after RoPE) that the attention keeps for its backward on the GPU. FPDT's chunk stores hold
    them instead (``estimate._fpdt_buffers``), as views of these very tensors with one Ulysses rank and no
    offload (an all-to-all of one rank is a slice): then they stay whole."""
    if settings.chunk_size is not None and (settings.fpdt_offload or settings.ulysses > 1):
        return 0
    return tokens * BF16 * (w.q + 2 * w.kv)


def norm_saved(settings: Settings, w: Widths, tokens: int) -> int:
    """What one RMSNorm saves besides its input: its output (the next projections' input) and 1/rms (or,
    without lean norms, the fp32 copy too)."""
    norm_extra = FP32 if settings.lean_rms_norm else FP32 * w.h + FP32
    return tokens * (norm_extra + BF16 * w.h)


def layer_saved(settings: Settings, w: Widths, tokens: int, recompute: bool, kept_output: bool) -> int:
    """What one layer's graph saves besides its input (under checkpointing: its recompute's graph, without the
    attention output where the layer keeps it: ``kept_output``)."""
    saved = (
        norm_saved(settings, w, tokens)  # input norm: the q/k/v projections' input
        + tokens * BF16 * w.h  # the residual sum saved by the post-attention norm
        + norm_saved(settings, w, tokens)  # post-attention norm: the MLP's input
        + attention_state(settings, w, tokens)
    )
    if not (recompute and kept_output):
        saved += kept_bytes(tokens, w)  # the attention output the o-projection saves
    if settings.mlp_tile_tokens is None:
        saved += tokens * mlp_saved_widths(settings) * BF16 * w.i
    return saved


def mlp_saved_widths(settings: Settings) -> int:
    """``intermediate``-wide tensors a gated MLP saves for its backward: gate, up, act(gate) and the product
    (the down projection's input); the fused gating (``fused_gated_mlp``) keeps no act(gate)."""
    return 3 if settings.fused_gated_mlp else 4


def unchecked_layer_bytes(settings: Settings, w: Widths, tokens: int) -> int:
    """What one layer without checkpointing keeps from its forward to its backward: its input and everything its
    graph saves (the attention output the o-projection saves among it)."""
    return layer_saved(settings, w, tokens, recompute=False, kept_output=False) + tokens * BF16 * w.h


__all__ = ["BF16", "FP32", "Reruns", "Widths", "attention_state", "checkpointed_layers", "inputs_kept", "keeps_input",
           "keeps_output", "kept_bytes", "layer_saved", "mlp_saved_widths", "norm_saved", "outputs_kept",
           "reruns", "unchecked_layer_bytes"]
