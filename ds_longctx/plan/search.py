"""The fastest configuration that fits a machine, and the longest sequence that fits at all.

Candidates vary every setting the block and ZeRO offer: the ``ulysses x ring`` factorizations of the
sequence-parallel group (Ulysses inside a node and at most the query heads), FPDT chunks with and
without host offload, kept attention, checkpoint offload of every layer or of the first ones (as many as
host memory holds), MLP and loss tiles, the optimizer in host memory (DeepSpeed's offload), and AdamW's moments
in host memory where only they keep a configuration from fitting the GPU, and layer inputs rebuilt in backward
(``checkpoint_every`` 2 to 4, with every attention output kept or only those the reruns take) where nothing fits
with every input kept, or where that is faster. A candidate fits when its GPU
peak stays under the GPU's memory less a margin and every node's pinned and other host memory under the
host's less a margin; the fastest fitting one (predicted step time, then the lowest GPU peak) wins.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, Iterable, Iterator, List, Optional

from ..checkpoint_pattern import RERUNS
from .host_optimizer import MOMENT_BYTES
from .machine import Machine
from .settings import Run, Settings
from .verdict import Margins, Verdict, judge

CHUNK_SIZES = (16384, 32768, 65536, 131072)
MLP_TILES = (None, 16384, 4096)
LOSS_TILES = (None, 4096)
REBUILT_EVERY = (2, 3, 4)  # checkpoint_every tried where nothing fits with every input kept


def valid_for(run: Run, settings: Settings) -> bool:
    """Whether the layout can split ``run.seq_len`` (zigzag halves per ring position, whole FPDT chunks)."""
    if run.world % settings.sp:
        return False
    group = run.seq_len // settings.ring
    if run.seq_len % (2 * settings.ring * settings.ulysses):
        return False
    if settings.chunk_size is not None and (group % settings.chunk_size or settings.chunk_size % settings.ulysses
                                            or settings.chunk_size >= group):
        return False
    return settings.ulysses <= run.model.heads


def factorizations(run: Run, machine: Machine) -> Iterator[tuple]:
    """``(ulysses, ring)`` of every sequence-parallel degree dividing the world; Ulysses inside a node."""
    for sp in (d for d in range(1, run.world + 1) if run.world % d == 0):
        for ulysses in (u for u in range(1, sp + 1) if sp % u == 0):
            if ulysses <= min(machine.per_node, run.model.heads):
                yield ulysses, sp // ulysses


def _offload_counts(run: Run, base: Settings, machine: Machine, margins: Margins) -> List[int]:
    """Checkpoint offload of no layer, every checkpointed layer, and the most the host can take. The host's
    share grows with the count, by uneven steps where layers keep different things (an input, an attention
    output, both), so the most is found by bisection."""
    layers = base.checkpointed(run.model.layers)
    if layers == 0:
        return [0]

    def fits_host(count: int) -> bool:
        return judge(run, base.with_(checkpoint_offload_layers=count), machine, margins).fits_host

    counts = {0, layers}
    if fits_host(0) and not fits_host(layers):
        counts.add(_last_fitting(fits_host, 0, layers)[0])
    return sorted(counts)


def _unchecked_fit(run: Run, base: Settings, machine: Machine, margins: Margins, offloaded: bool) -> int:
    """The most last layers that can go without checkpointing with the GPU peak still fitting (0: none), the
    checkpointed layers' inputs in host memory (``offloaded``) or not. The peak grows with each unchecked
    layer's activations, so the count is found by bisection."""
    layers = run.model.layers

    def fits(unchecked: int) -> bool:
        checkpointed = layers - unchecked
        settings = base.with_(checkpoint_layers=checkpointed,
                              checkpoint_offload_layers=checkpointed if offloaded else 0)
        return judge(run, settings, machine, margins).fits_gpu

    if not fits(1):  # the common case at long sequences: settle it with one estimate
        return 0
    return _last_fitting(fits, 1, layers + 1)[0]  # more unchecked layers than the model has cannot fit


def _checkpoint_layer_counts(run: Run, base: Settings, machine: Machine, margins: Margins,
                             fixed: Dict) -> List[Optional[int]]:
    """Checkpointed layers to try: every layer (None), none, and all but as many last layers as the GPU holds
    with their activations, with the checkpoints on the GPU or in host memory (at least the fixed checkpoint
    offload's layers: only checkpointed layers offload)."""
    if "checkpoint_layers" in fixed:
        return [fixed["checkpoint_layers"]]
    if not run.checkpointing:
        return [None]
    layers = run.model.layers
    counts = {layers, 0} | {layers - _unchecked_fit(run, base, machine, margins, offloaded)
                            for offloaded in (False, True)}
    least = fixed.get("checkpoint_offload_layers", 0)
    counts = {max(least, n) for n in counts}
    return [None if n >= layers else n for n in sorted(counts, reverse=True)]


def _offload_options(run: Run, settings: Settings, machine: Machine, margins: Margins, fixed: Dict) -> List[int]:
    if fixed.get("checkpoint_offload_all"):
        return [settings.checkpointed(run.model.layers) if run.checkpointing else 0]
    if "checkpoint_offload_layers" in fixed:
        return [fixed["checkpoint_offload_layers"]]
    return _offload_counts(run, settings, machine, margins) if run.checkpointing else [0]


def candidates(run: Run, machine: Machine, margins: Margins, fixed: Optional[Dict] = None,
               base: Settings = Settings(), everies: tuple = (1,)) -> Iterable[Settings]:
    """Every setting combination valid for ``run``, with ``checkpoint_every`` in ``everies``; ``fixed`` (Settings
    field -> value) pins fields (``checkpoint_offload_all``: every checkpointed layer offloaded)."""
    fixed = fixed or {}
    pairs = ([(fixed["ulysses"], fixed["ring"])] if "ulysses" in fixed and "ring" in fixed
             else list(factorizations(run, machine)))
    option = lambda name, values: [fixed[name]] if name in fixed else list(values)  # noqa: E731
    host_states = fixed.get("host_optimizer_states", base.host_optimizer_states)
    for (ulysses, ring), chunk, keep, mlp, loss, opt, every in itertools.product(
            pairs, option("chunk_size", (None,) + CHUNK_SIZES),
            option("keep_attention_output", (True, False, RERUNS)),
            option("mlp_tile_tokens", MLP_TILES), option("loss_tile_tokens", LOSS_TILES),
            option("optimizer_offload", (False, True)),
            option("checkpoint_every", everies if run.checkpointing else (1,))):
        if opt and host_states:  # DeepSpeed's offloaded optimizer has its own moments on the CPU
            continue
        if keep == RERUNS and every == 1:  # no reruns: it keeps nothing, as false does
            continue
        for fpdt_offload in option("fpdt_offload", (False, True) if chunk is not None else (False,)):
            if fpdt_offload and chunk is None:
                continue
            settings = base.with_(ulysses=ulysses, ring=ring, chunk_size=chunk, fpdt_offload=fpdt_offload,
                                  keep_attention_output=keep, mlp_tile_tokens=mlp, loss_tile_tokens=loss,
                                  zero=base.zero.__class__(**{**base.zero.__dict__, "optimizer_offload": opt}),
                                  host_optimizer_states=host_states, checkpoint_offload_layers=0,
                                  checkpoint_every=every)
            if not valid_for(run, settings):
                continue
            for checkpoint_layers in _checkpoint_layer_counts(run, settings, machine, margins, fixed):
                layered = settings.with_(checkpoint_layers=checkpoint_layers)
                for count in _offload_options(run, layered, machine, margins, fixed):
                    yield layered.with_(checkpoint_offload_layers=count)


def _judged(run: Run, settings: Settings, machine: Machine, margins: Margins, fixed: Dict) -> List[Verdict]:
    """The verdict of ``settings`` and, where AdamW's moments on the GPU are all that keeps them from fitting it,
    of the same settings with the moments in host memory (``host_optimizer_states``): streaming them is never
    faster, so it is a choice only where it makes a configuration fit."""
    verdict = judge(run, settings, machine, margins)
    if (verdict.fits_gpu or "host_optimizer_states" in fixed or settings.host_optimizer_states
            or settings.zero.optimizer_offload
            or verdict.estimate.gpu_peak - MOMENT_BYTES * run.model.params // run.world > verdict.gpu_limit):
        return [verdict]
    moved = settings.with_(host_optimizer_states=True)
    verdicts = [verdict, judge(run, moved, machine, margins)]
    # the moments take host memory the checkpoint offload counted on: also offload only as many layers as the
    # host still holds, the rest of the checkpoints (and kept outputs) staying on the GPU the moments left
    for count in _offload_options(run, moved.with_(checkpoint_offload_layers=0), machine, margins, fixed):
        if count not in (0, settings.checkpoint_offload_layers):
            verdicts.append(judge(run, moved.with_(checkpoint_offload_layers=count), machine, margins))
    return verdicts


#: Layers left unchecked hold their whole activations on the GPU for backward: they are used only where they
#: save at least this fraction of the step time predicted with every layer checkpointed (the step time is
#: checked to within 20%, so a smaller predicted gain does not justify the memory).
UNCHECKED_MIN_GAIN = 0.02


def best(run: Run, machine: Machine, margins: Margins, fixed: Optional[Dict] = None,
         base: Settings = Settings()) -> tuple:
    """``(the fastest fitting Verdict or None, the Verdict of the smallest GPU peak seen)``; a configuration
    with layers left unchecked wins only when it is :data:`UNCHECKED_MIN_GAIN` faster than the fastest with
    every layer checkpointed. Inputs are rebuilt (``checkpoint_every`` above 1, unless ``fixed`` sets it) where
    no configuration fits with every checkpointed layer keeping its input, or where the fastest that does
    recomputes the attention: a rerun that takes a kept attention output costs only the layer's projections
    and MLP, so memory freed of inputs can hold the attention outputs. Wherever every input and every
    attention output fit, the search stays as short as without rebuilt inputs."""
    fixed = fixed or {}
    if "checkpoint_every" in fixed or not run.checkpointing:
        return _fastest(run, machine, margins, fixed, base)
    kept, kept_smallest = _fastest(run, machine, margins, {**fixed, "checkpoint_every": 1}, base)
    if kept is not None:
        if kept.settings.keep_attention_output is True or fixed.get("keep_attention_output") is False:
            return kept, kept_smallest
        keeps = [fixed["keep_attention_output"]] if "keep_attention_output" in fixed else [True, RERUNS]
        for keep in keeps:
            rebuilt, _ = _fastest(run, machine, margins, {**fixed, "keep_attention_output": keep}, base, REBUILT_EVERY)
            if rebuilt is not None and rebuilt.estimate.step_seconds < kept.estimate.step_seconds:
                kept = rebuilt
        return kept, kept_smallest
    rebuilt, smallest = _fastest(run, machine, margins, fixed, base, REBUILT_EVERY)
    if kept_smallest is not None and (smallest is None
                                      or kept_smallest.estimate.gpu_peak < smallest.estimate.gpu_peak):
        smallest = kept_smallest
    return rebuilt, smallest


def _fastest(run: Run, machine: Machine, margins: Margins, fixed: Dict, base: Settings,
             everies: tuple = (1,)) -> tuple:
    """:func:`best` over the candidates with ``checkpoint_every`` in ``everies`` (where ``fixed`` does not set it)."""
    key = lambda v: (v.estimate.step_seconds, v.estimate.gpu_peak)  # noqa: E731
    fastest: Dict[bool, Verdict] = {}  # by whether some layer is left unchecked
    smallest: Optional[Verdict] = None
    for verdict in (v for settings in candidates(run, machine, margins, fixed, base, everies)
                    for v in _judged(run, settings, machine, margins, fixed)):
        settings = verdict.settings
        if smallest is None or verdict.estimate.gpu_peak < smallest.estimate.gpu_peak:
            smallest = verdict
        unchecked = settings.checkpointed(run.model.layers) < run.model.layers
        if verdict.fits and (unchecked not in fastest or key(verdict) < key(fastest[unchecked])):
            fastest[unchecked] = verdict
    every, some = fastest.get(False), fastest.get(True)
    if some is not None and (every is None or some.estimate.step_seconds
                             < every.estimate.step_seconds * (1 - UNCHECKED_MIN_GAIN)):
        return some, smallest
    return every, smallest


def fits_at_all(run: Run, machine: Machine, margins: Margins, fixed: Optional[Dict] = None,
                base: Settings = Settings()) -> bool:
    """Whether :func:`best` finds a configuration that fits, without ranking them: it stops at the first that fits
    (rebuilt inputs count, as :func:`best` tries them where nothing else fits)."""
    fixed = fixed or {}
    everies = (1,) if "checkpoint_every" in fixed or not run.checkpointing else (1,) + REBUILT_EVERY
    # a kept attention output only adds memory (on the GPU or the host) to the same settings without it, so
    # whether anything fits is settled by the candidates that keep none
    fixed = {"keep_attention_output": False, **fixed}
    return any(verdict.fits for settings in candidates(run, machine, margins, fixed, base, everies)
               for verdict in _judged(run, settings, machine, margins, fixed))


def longest(run: Run, machine: Machine, margins: Margins, fixed: Optional[Dict] = None,
            base: Settings = Settings(), granule: int = 32768, fine: int = 1024,
            limit: int = 1 << 27) -> Optional[Verdict]:
    """The fitting configuration of the longest sequence, or None when not even ``granule`` tokens fit.

    The length is found in multiples of ``granule`` tokens, then refined between the longest fitting and the
    shortest failing multiple in steps of ``fine`` tokens, so 1.1x the answer does not fit (lengths that FPDT
    chunks do not divide are planned without chunks)."""
    granule, fine = math.lcm(granule, 2 * run.world), math.lcm(fine, 2 * run.world)
    fits = lambda tokens: fits_at_all(run.with_seq_len(tokens), machine, margins, fixed, base)  # noqa: E731
    fastest = lambda tokens: best(run.with_seq_len(tokens), machine, margins, fixed, base)[0]  # noqa: E731
    if not fits(granule):
        return None
    low, high = 1, 2
    while high * granule <= limit and fits(high * granule):
        low, high = high, high * 2
    low, high = _last_fitting(fits, low, high, granule)
    if high * granule > limit:
        return fastest(low * granule)
    low, _ = _last_fitting(fits, low * granule // fine, high * granule // fine, fine)  # granule: a multiple of fine
    return fastest(low * fine)


def _last_fitting(fits, low: int, high: int, step: int = 1) -> tuple:
    """Bisect ``low < high`` (``fits(low * step)``, not ``fits(high * step)``, ``fits`` monotone) down to adjacent
    multiples of ``step``: tokens of a sequence, or a count of layers."""
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid * step):
            low = mid
        else:
            high = mid
    return low, high


__all__ = ["CHUNK_SIZES", "REBUILT_EVERY", "Margins", "UNCHECKED_MIN_GAIN", "Verdict", "best", "candidates",
           "factorizations", "fits_at_all", "judge", "longest", "valid_for"]
