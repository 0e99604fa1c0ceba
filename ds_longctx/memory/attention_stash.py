"""The attention stash of a checkpointed region (:mod:`ds_longctx.memory.remat`) and its protocol.

A region runs inside an :class:`AttentionStash`. The first run (the forward) *records*: every call of
:func:`ds_longctx.attention.attention` in it computes as usual and leaves its output and log-sum-exp in the
stash. Every later run (the recompute in backward) *replays*: the attention calls, in the same order, redo
only their communication (the all-to-alls that rebuild the head-scattered q/k/v the backward reads) and
take their output and log-sum-exp from the stash, so no attention kernel runs forward twice. The gradients
are exactly those of plain checkpointing: the backward reads the same values.

FPDT chunked attention keeps its saved chunks outside autograd's saved tensors (in host memory, with
offload), where a checkpoint cannot see them: under a plain ``torch.utils.checkpoint`` the forward's chunks
would stay alive until backward and the recompute's would be thrown away. In a stash region the forward run
keeps no chunks and the recompute hands its chunks to the forward's autograd node.

The active stash is per thread, like autocast state: backward's recompute may run on an autograd worker
thread, and the region sets its stash on whichever thread runs it.

The protocol an attention Function follows (this module is the one place it is written down):

* forward: ``call = stash_call(key)`` (None outside a region; ``key`` identifies the call so a replay can
  check it meets the same call). On a replay ``call.replayed()`` gives the kept output and lses (or None
  when the stash keeps none) and the forward only redoes the communication the backward reads. On the
  recorded run, ``call.record(out, lses)`` keeps them (a no-op when the stash keeps no outputs).
* a rerun (a layer run once more without grad to rebuild the next layer's input,
  :mod:`.input_recompute`): before anything else the forward asks ``rerun_output(key)``; a tensor is the
  call's kept output, returned as the attention's output with no communication and no kernel (nothing of a
  rerun reaches a backward); None (no kept output, or not a rerun): it computes as usual.
* state kept outside autograd (FPDT's chunk stores): the forward hands it over with
  :func:`keep_for_backward`, which also saves one empty *token* tensor through ``ctx.save_for_backward``;
  the backward calls :func:`take_for_backward` first. Unpacking that token is what makes a non-reentrant
  checkpoint run the recompute before the rest of this node's backward (it recomputes at the first
  unpack of a saved tensor of the region), so the recompute's state is in the stash by the time it is
  read. ``tests/test_stash_protocol.py::test_unpacking_a_saved_token_runs_the_recompute_first`` pins that
  torch behaviour. (A reentrant checkpoint recomputes before any backward of the region and runs the
  backward of the recompute's own nodes, which hold their state on ``ctx``.)
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .chunk_store import HostCopy
from .host_pool import HostPool

_local = threading.local()


class AttentionStashError(RuntimeError):
    """A replayed region called the attention differently from its recorded run."""


class StashedCall:
    """One attention call of a region: what identifies it, its kept ``out`` (the returned tensor, caller's
    layout) and log-sum-exps (one per head chunk or FPDT query chunk, fp32) when the stash keeps outputs,
    and the saved state a recompute hands to the forward's autograd node (FPDT keeps its chunks outside
    autograd's saved tensors, where a checkpoint cannot see them)."""

    def __init__(self, key: Tuple):
        self.key = key
        self.replaying = False  # this run is a replay: take the output instead of computing it
        self.keeps_output = False  # this run records an output to keep
        self.host_pool: Optional[HostPool] = None  # where kept outputs wait (the stash's pool)
        self.out: Optional[torch.Tensor] = None
        self.lses: List[torch.Tensor] = []
        self.version = 0
        self.state: Any = None
        self._host: Optional[HostCopy] = None  # an output kept in host memory

    def keep(self, out: torch.Tensor, lses: Sequence[torch.Tensor], lease=None) -> None:
        """Keep ``out`` and ``lses``; with a host ``lease`` (FPDT offload) ``out`` goes to pinned host memory
        on the offload side stream and comes back when the recompute asks for it."""
        self.lses = [t.detach() for t in lses]
        if lease is None:
            self.out, self.version = out.detach(), out._version
            return
        self._host = HostCopy(out, lease)

    def record(self, out: torch.Tensor, lses: Sequence[torch.Tensor],
               fallback_pool: Optional[HostPool] = None) -> None:
        """On the recorded run of a stash that keeps outputs, keep ``out`` and ``lses`` (in the stash's host
        pool, else in ``fallback_pool``: the attention's own when it offloads, FPDT; else on the device)."""
        if not self.keeps_output:
            return
        pool = self.host_pool if self.host_pool is not None else fallback_pool
        self.keep(out, lses, pool.lease() if pool is not None else None)

    def replayed(self) -> Optional["StashedCall"]:
        """On a replay, the kept output and lses (:meth:`kept`); None on the recorded run or when none was kept."""
        return self.kept() if self.replaying else None

    def prefetch(self) -> None:
        """Start copying an output kept in host memory back to the device (the replay's :meth:`kept` waits)."""
        if self._host is not None and self.out is None:
            self._host.prefetch()

    def kept(self) -> Optional["StashedCall"]:
        """Self when an output was kept (and not modified since), else None."""
        if self._host is not None and self.out is None:
            # A snapshot taken at the forward: back to the device, ordered on the current stream. The store
            # and its lease stay until this call is dropped, when the copy is long done.
            self.out = self._host.get()
            self.version = self.out._version
        if self.out is None:
            return None
        self._check_unmodified()
        return self

    def output_copy(self) -> Optional[torch.Tensor]:
        """The kept output for a rerun, without keeping it: from host memory a fresh device copy each time (the
        replay in the region's own backward fetches it again), else the kept tensor; None when none was kept."""
        if self._host is not None and self.out is None:
            return self._host.get()
        if self.out is None:
            return None
        self._check_unmodified()
        return self.out.detach()

    def _check_unmodified(self) -> None:
        if self.out._version != self.version:
            raise AttentionStashError("the attention output kept for backward was modified in place after the "
                                      "forward; copy it before changing it (out = out.clone())")

    def take_state(self) -> Any:
        state, self.state = self.state, None
        return state


class AttentionStash:
    """The attention calls of one checkpointed region, recorded on its first run and replayed, in call
    order, on each later one. ``keep_output=False`` keeps no outputs (the recompute runs the attention again)
    but still hands FPDT's saved state from the recompute to the forward's node. With a host ``pool`` the
    kept outputs wait in (pinned) host memory and are fetched back when the replay starts."""

    def __init__(self, keep_output: bool = True, pool: Optional[HostPool] = None):
        self.keep_output = keep_output
        self.pool = pool
        self._calls: List[StashedCall] = []
        self._runs = 0
        self._cursor = 0

    @property
    def replaying(self) -> bool:
        return self._runs > 1

    @contextmanager
    def region(self) -> Iterator["AttentionStash"]:
        """One run of the region: the first records, later ones replay from the first call."""
        self._runs += 1
        self._cursor = 0
        if self.replaying:
            for entry in self._calls:
                entry.prefetch()  # in flight while the region recomputes up to its first attention
        stack = _stack()
        stack.append(self)
        try:
            yield self
        finally:
            stack.pop()
        if self.replaying and self._cursor != len(self._calls):
            raise AttentionStashError(f"the recomputed region made {self._cursor} attention calls, its forward "
                                      f"made {len(self._calls)}: a checkpointed region must be deterministic")

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` run inside :meth:`region` (what a checkpoint function is given to run and rerun)."""

        def run(*args, **kwargs):
            with self.region():
                return fn(*args, **kwargs)

        return run

    def rerun(self, fn: Callable) -> Callable:
        """``fn`` run again without grad after the recorded run, its attention calls taking their kept outputs
        in call order (:func:`rerun_output`); neither the replay to come nor any entry changes."""

        def run(*args, **kwargs):
            stack = _stack()
            stack.append(_Rerun(self))
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()

        return run

    def recorded(self, index: int, key: Tuple) -> StashedCall:
        """The recorded run's ``index``-th call, checked to be the one identified by ``key``."""
        if index >= len(self._calls):
            raise AttentionStashError(f"the rerun region calls the attention more often than its forward did "
                                      f"({len(self._calls)} calls): a checkpointed region must be deterministic")
        entry = self._calls[index]
        if entry.key != key:
            raise AttentionStashError(f"attention call {index + 1} of the rerun region differs from the forward's: "
                                      f"{key} != {entry.key}")
        return entry

    def call(self, key: Tuple) -> StashedCall:
        """The entry of the next attention call: a new one on the first run, the recorded twin on a replay."""
        if not self.replaying:
            entry = StashedCall(key)
            entry.keeps_output, entry.host_pool = self.keep_output, self.pool
            self._calls.append(entry)
            return entry
        if self._cursor >= len(self._calls):
            raise AttentionStashError(f"the recomputed region calls the attention more often than its forward "
                                      f"did ({len(self._calls)} calls): a checkpointed region must be deterministic")
        entry = self._calls[self._cursor]
        self._cursor += 1
        if entry.key != key:
            raise AttentionStashError(f"attention call {self._cursor} of the recomputed region differs from the "
                                      f"forward's: {key} != {entry.key}")
        entry.replaying, entry.keeps_output = True, False
        return entry


class _Rerun:
    """A recorded region running again without grad (:meth:`AttentionStash.rerun`): the position of its next
    attention call."""

    def __init__(self, stash: AttentionStash):
        self.stash, self.cursor = stash, 0

    def output(self, key: Tuple) -> Optional[torch.Tensor]:
        entry = self.stash.recorded(self.cursor, key)
        self.cursor += 1
        return entry.output_copy()


def _stack() -> List[Union[AttentionStash, _Rerun]]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def active_stash() -> Optional[AttentionStash]:
    """The stash of the innermost region running on this thread, or None (also inside a rerun: it records
    and replays nothing)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack and isinstance(stack[-1], AttentionStash) else None


def rerun_output(key: Tuple) -> Optional[torch.Tensor]:
    """Inside a rerun (:meth:`AttentionStash.rerun`) on this thread, the kept output of the attention call
    identified by ``key`` (the region's next one), in the caller's layout; None elsewhere, or when the call
    kept no output (the caller then computes it)."""
    stack = getattr(_local, "stack", None)
    return stack[-1].output(key) if stack and isinstance(stack[-1], _Rerun) else None


def stash_call(key: Tuple) -> Optional[StashedCall]:
    """The stash entry of the attention call identified by ``key`` when it runs in a stash region on this
    thread (the next one of the region: recorded now, or its recorded twin on a replay), else None."""
    stash = active_stash()
    return stash.call(key) if stash is not None else None


def keep_for_backward(ctx, call: Optional[StashedCall], state: Any, device: torch.device) -> None:
    """Forward side of handing state kept outside autograd to the backward: on ``ctx`` and, in a stash
    region, on ``call`` (from a replay, this is how the recompute's state reaches the forward's node). Saves
    the token tensor that makes a checkpoint's backward recompute before :func:`take_for_backward` reads."""
    ctx.stash_call, ctx.stash_state = call, state
    if call is not None and state is not None:
        call.state = state
    # One token tensor through autograd's saved tensors, so that a checkpoint's backward unpacks it
    # (and so recomputes the region) before this node looks for the recompute's state.
    ctx.save_for_backward(torch.empty(0, device=device))


def take_for_backward(ctx) -> Any:
    """Backward side of :func:`keep_for_backward`: runs the recompute when under a checkpoint (by unpacking
    the token) and returns the node's own state, else the recompute's; None if there is none (a second
    backward, or a forward without grad). Drops every reference: the node outlives its backward (the
    caller's loss keeps the graph into the next step), and so would the stash entry with its kept output."""
    ctx.saved_tensors  # noqa: B018 - under a checkpoint this recomputes the region, which hands over the state
    state, ctx.stash_state = ctx.stash_state, None
    call, ctx.stash_call = ctx.stash_call, None
    if call is not None:
        recomputed = call.take_state()
        if state is None:
            state = recomputed
    return state


__all__ = ["AttentionStash", "AttentionStashError", "StashedCall", "active_stash", "keep_for_backward", "rerun_output",
           "stash_call", "take_for_backward"]
