"""Name the rank that failed or went silent when a collective breaks, instead of a bare timeout.

A collective that waits for a rank which raised, died or hangs ends, on the other ranks, with a backend
error that names no rank (gloo: "Timed out waiting 600000ms for recv operation", "Connection closed by
peer [127.0.0.1]:..."). :class:`RankWatch` keeps one record per rank in the rendezvous store that every
process group already shares: what the rank is doing (``with watch.during("step 12"):``), or the exception
it raised. When a collective breaks on a rank, that rank records it, waits (at most the process groups'
timeout) for the other ranks to record theirs, and raises :class:`RankFailure` naming the ranks that
raised, with their exception, or that said nothing (died or hang), with the activity they were in.

The timeout itself is the process groups' (``long_context.timeout_s``, which :func:`ds_longctx.initialize`
passes to ``init_distributed`` and every group of the ``Topology``): with gloo, any collective that waits
longer raises on the waiting rank, and a dead peer's closed connection raises at once. NCCL needs
``TORCH_NCCL_ASYNC_ERROR_HANDLING`` (see :func:`nccl_error_handling_env`).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional

import torch.distributed as dist

_KEY = "ds_longctx/watch/rank{}"
# Substrings of the errors gloo and NCCL raise when a peer is gone or late (both raise plain RuntimeError).
_BACKEND_MARKERS = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                    "gloo/transport", "NCCL", "Broken pipe")


class RankFailure(RuntimeError):
    """Another rank raised, died or hangs; the message names it and what it was doing."""


@dataclass
class RankRecord:
    """What one rank last told the store. ``state``: ``running`` (inside ``doing``), ``between`` (``doing``
    finished), ``failed`` (raised ``error`` inside ``doing``), ``broken`` (a collective broke under it)."""

    state: str
    doing: str
    error: str = ""

    def dumps(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def loads(cls, raw: bytes) -> "RankRecord":
        return cls(**json.loads(raw.decode()))


def is_backend_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective broken by a peer (gone or late), not an error of this rank's own."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _BACKEND_MARKERS)


def nccl_error_handling_env() -> Dict[str, str]:
    """Set (where the user has not) what PyTorch's NCCL backend needs so that a collective waiting on a
    failed or silent rank ends after the process group's timeout instead of hanging; returns what it set.

    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``: the watchdog aborts the communicators and the process when a
    collective times out or fails (PyTorch's default; ``0`` would let it hang forever, so it is warned about).
    ``TORCH_NCCL_DUMP_ON_TIMEOUT=1`` with ``TORCH_NCCL_TRACE_BUFFER_SIZE``: the flight recorder dumps the
    last collectives of each rank on a timeout (which rank did not enter which collective). Must run before
    the NCCL process group is created.
    """
    wanted = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
              "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000"}
    set_now = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(set_now)
    if os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "0":
        warnings.warn("TORCH_NCCL_ASYNC_ERROR_HANDLING=0: a rank that dies or hangs leaves the others waiting "
                      "forever; unset it (PyTorch's default, 3) so that long_context.timeout_s ends them")
    return set_now


class RankWatch:
    """This rank's record in the rendezvous store, and the diagnosis when a collective breaks.

    Args:
        timeout_s: the process groups' timeout; also how long a rank whose collective broke waits for the
            other ranks' records before naming the silent ones (so every rank exits within about
            ``2 * timeout_s`` of the failure). ``None``: PyTorch's default process-group timeout.

    Without an initialized multi-rank world, ``during`` only runs its block.
    """

    def __init__(self, timeout_s: Optional[float] = None):
        default = dist.constants.default_pg_timeout.total_seconds()
        self.timeout_s = float(timeout_s) if timeout_s is not None else default
        self._store = None
        self._rank = 0
        self._world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._store = dist.distributed_c10d._get_default_store()
            self._rank, self._world = dist.get_rank(), dist.get_world_size()

    def _set(self, record: RankRecord) -> None:
        if self._store is not None:
            self._store.set(_KEY.format(self._rank), record.dumps())

    @contextlib.contextmanager
    def during(self, doing: str) -> Iterator[None]:
        """Run the block as ``doing`` (e.g. ``"step 12"``): recorded for the other ranks' diagnosis. A
        collective that breaks inside raises :class:`RankFailure` naming the culprit ranks; any other
        exception is recorded (for the other ranks' message) and re-raised unchanged."""
        if self._store is None:
            yield
            return
        self._set(RankRecord("running", doing))
        try:
            yield
        except RankFailure:
            raise
        except BaseException as exc:
            if not is_backend_error(exc):
                self._set(RankRecord("failed", doing, f"{type(exc).__name__}: {_first_line(exc)}"))
                raise
            raise RankFailure(self.diagnose(doing, exc)) from exc
        self._set(RankRecord("between", doing))

    def diagnose(self, doing: str, exc: BaseException) -> str:
        """Record that a collective broke under ``doing`` on this rank; return who is to blame (the ranks
        that raised, else the ranks that recorded no broken collective within ``timeout_s``)."""
        mine = f"rank {self._rank} stopped while {doing}: a collective broke ({_first_line(exc)})"
        try:
            self._set(RankRecord("broken", doing, _first_line(exc)))
            records = self._wait_for_others()
        except Exception as store_exc:  # noqa: BLE001 - the store host (rank 0) may be the dead rank
            return (f"{mine}; the rendezvous store is unreachable ({_first_line(store_exc)}), so rank 0 "
                    f"(which hosts it) is probably the rank that died")
        failed = {r: rec for r, rec in records.items() if rec is not None and rec.state == "failed"}
        if failed:
            blame = "; ".join(f"rank {r} raised while {rec.doing}: {rec.error}" for r, rec in sorted(failed.items()))
            return f"{blame} ({mine})"
        silent = {r: rec for r, rec in records.items() if rec is None or rec.state != "broken"}
        if not silent:
            return f"{mine}; every rank saw a broken collective (a network failure?)"
        what = "; ".join(f"rank {r} went silent " + (f"while {rec.doing}" if rec.state == "running" else
                                                     f"after {rec.doing}" if rec is not None else
                                                     "before recording anything")
                         for r, rec in sorted(silent.items(), key=lambda kv: kv[0]))
        return (f"{what} (died or hangs: no answer within timeout_s={self.timeout_s:g}s); {mine}")

    def _wait_for_others(self) -> Dict[int, Optional[RankRecord]]:
        """The other ranks' records once each has failed or seen the breakage, or after ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        others: List[int] = [r for r in range(self._world) if r != self._rank]
        while True:
            records = {r: self._get(r) for r in others}
            settled = all(rec is not None and rec.state in ("failed", "broken") for rec in records.values())
            if settled or any(rec is not None and rec.state == "failed" for rec in records.values()) \
                    or time.monotonic() > deadline:
                return records
            time.sleep(0.2)

    def _get(self, rank: int) -> Optional[RankRecord]:
        key = _KEY.format(rank)
        if not self._store.check([key]):
            return None
        return RankRecord.loads(self._store.get(key))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["RankFailure", "RankRecord", "RankWatch", "is_backend_error", "nccl_error_handling_env"]
