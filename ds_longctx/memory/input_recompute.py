"""Layer inputs rebuilt in backward from an earlier checkpoint instead of kept from forward to backward.

Under activation checkpointing every checkpointed layer keeps its input, one ``[B, S_local, hidden]``
activation, until its backward: for a deep model at long sequences these are most of what a step holds
across it (28 layers at 1M tokens and hidden 3072 keep 168 GiB, on the GPU or in host memory), and where
they no longer fit, nothing longer trains. :class:`InputRecompute` keeps the input of every ``every``-th
checkpointed layer only. A layer in between saves, in place of its input, a :class:`RecomputedInput`: in
backward, when the layer's checkpoint asks for its input, the layer before it runs its forward once more
(without grad, from its own kept or again rebuilt input) and hands over its output, which is exactly the
input it gave in forward (same inputs, the same RNG state and autocast state). The layer before then
recomputes as usual in its own backward.

Memory: ``every`` times fewer kept inputs; in backward, the layer before's input and forward working set
while it reruns (less than a layer's backward working set). Time: the layer at offset ``j`` of its group
reruns ``j`` forwards of the layers before it, ``(every - 1) / 2`` extra layer forwards per layer; a layer that
keeps its attention output reruns without its attention (it takes the kept output:
:meth:`~ds_longctx.memory.attention_stash.AttentionStash.rerun`).

It works through the same saved-tensor hooks as :mod:`.checkpoint_offload` (which it wraps: the inputs it
keeps still go to host memory when the region offloads): a non-reentrant checkpoint saves its inputs as
saved tensors of the enclosing graph. A region takes part only when it is called with its hidden states
as its one positional tensor (how transformers calls its decoder layers: the rest is bound in the function)
and those are the previous region's output; any other region keeps its input and starts a new group.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Tuple

import torch


@dataclass
class _Autocast:
    """Autocast state at a region's forward, to rerun it alike."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def now(cls, device_type: str) -> "_Autocast":
        return cls(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def context(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


@dataclass
class _RngState:
    """The CPU generator's and the input device's generator's states at a region's forward (dropout)."""

    cpu: torch.Tensor
    device: Optional[torch.Tensor]
    device_index: Optional[int]

    @classmethod
    def now(cls, device: torch.device) -> "_RngState":
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
        return cls(torch.get_rng_state(), None, None)

    @contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.device_index] if self.device_index is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.device, self.device_index)
            yield


@dataclass
class Producer:
    """A checkpointed region whose output is the next region's input: how to run its forward again.

    ``saved_input`` is its input as its checkpoint saved it (the tensor, the offload's host copy, or a
    :class:`RecomputedInput` when its own input is rebuilt); ``unpack`` turns that back into the tensor."""

    fn: Callable[..., Any]
    saved_input: Any
    unpack: Callable[[Any], torch.Tensor]
    rng: _RngState
    autocast: Tuple[_Autocast, ...]

    def rerun(self) -> torch.Tensor:
        """The region's output, computed again without grad from its saved input (``[B, S_local, hidden]``)."""
        x = self.unpack(self.saved_input)
        contexts = [c.context() for c in self.autocast]
        with torch.no_grad(), self.rng.restored(), contexts[0], contexts[1] if len(contexts) > 1 else nullcontext():
            out = self.fn(x)
        return _hidden(out)


@dataclass
class _Region:
    """What a region's pack hook compares against and records into, while the region runs."""

    hidden: Optional[torch.Tensor]
    previous: Optional[Producer]
    producer: Optional[Producer]


class RecomputedInput:
    """What a region saves in place of its input: the region that produced it."""

    __slots__ = ("producer",)

    def __init__(self, producer: Producer):
        self.producer = producer


def _hidden(out: Any) -> torch.Tensor:
    """A region's hidden-state output: the tensor, or the first element of the tuple some layers return."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _restorer(offload_unpack: Callable[[Any], Any]) -> Callable[[Any], torch.Tensor]:
    """What turns a saved input back into the tensor: a rebuilt one reruns its producer, the others go through
    the offload's unpack (or are the tensor)."""

    def restore(saved: Any) -> torch.Tensor:
        if isinstance(saved, RecomputedInput):
            return saved.producer.rerun()
        return offload_unpack(saved)

    return restore


def _key(t: torch.Tensor) -> Tuple:
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)


class InputRecompute:
    """Keep the input of every ``every``-th checkpointed region of a forward; rebuild the others' in backward.

    One instance per model, like :class:`~ds_longctx.memory.checkpoint_offload.CheckpointOffload`: it chains
    the regions in forward order. Call :meth:`begin_forward` before each forward (the model's pre-hook) and
    :meth:`break_chain` for a layer that runs without a checkpoint; run each checkpoint call inside
    :meth:`region`.
    """

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = every
        self._previous: Optional[Producer] = None  # the last region's, during a forward
        # the last region's output, held (it is the next region's input anyway) until the next region starts, so
        # that a tensor at its address is known to share its memory (hooks may hand the next region an alias)
        self._previous_output: Optional[torch.Tensor] = None
        self._offset = 0  # the next region's position in its group
        self._backward_seen = False

    def begin_forward(self) -> None:
        self.break_chain()
        self._backward_seen = False

    def break_chain(self) -> None:
        """A layer ran without a checkpoint: the next region keeps its input."""
        self._previous, self._previous_output, self._offset = None, None, 0

    @contextmanager
    def region(self, fn: Callable[..., Any], args: Tuple, offload=None) -> Iterator[Callable[[Any], Any]]:
        """Around one checkpoint call of ``fn(*args)`` (``fn``: the layer's function, as the checkpoint
        reruns it; ``offload``: the region's CheckpointOffload or None). Yields a function that must be
        given the region's output; what the region saves goes through this region's hooks."""
        if self._backward_seen:  # for callers without a pre-hook
            self.begin_forward()
        hidden = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
        if hidden is None or not hidden.is_floating_point():
            self.break_chain()
            yield lambda out: None
            return
        previous, previous_output = self._previous, self._previous_output
        self._previous_output = None
        chained = (previous is not None and self._offset % self.every != 0 and previous_output is not None
                   and _key(previous_output) == _key(hidden))
        del previous_output
        if not chained:
            self._offset = 0
        offload_pack = offload.pack if offload is not None else (lambda t: t)
        restore = _restorer(offload.unpack if offload is not None else (lambda p: p))
        producer = Producer(fn=fn, saved_input=None, unpack=restore,
                            rng=_RngState.now(hidden.device),
                            autocast=tuple(_Autocast.now(d) for d in dict.fromkeys((hidden.device.type, "cpu"))))

        # autograd keeps a saved tensor's pack hook as long as its unpack hook: what pack reads lives in a
        # record that is emptied when the region ends, so the hooks hold neither input nor producer after it
        region = _Region(hidden=hidden, previous=previous if chained else None, producer=producer)

        def pack(t: torch.Tensor) -> Any:
            if region.hidden is not None and (t is region.hidden or _key(t) == _key(region.hidden)):
                packed = RecomputedInput(region.previous) if region.previous is not None else offload_pack(t)
                region.producer.saved_input = packed
                return packed
            return offload_pack(t)

        def unpack(packed: Any) -> Any:
            self._backward_seen = True
            self._previous = self._previous_output = None  # forward is over: hold nothing past its backward
            return restore(packed)

        def done(out: Any) -> None:
            output = _hidden(out)
            if producer.saved_input is None or not isinstance(output, torch.Tensor):
                self.break_chain()  # nothing saved its input (no grad): nothing to rerun from
                return
            self._previous, self._previous_output = producer, output
            self._offset += 1

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield done
        finally:
            region.hidden = region.previous = region.producer = None

    def __repr__(self) -> str:
        return f"InputRecompute(every={self.every})"


__all__ = ["InputRecompute", "Producer", "RecomputedInput"]
