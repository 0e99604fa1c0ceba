"""Checkpoints that are complete or absent: a run killed at any moment resumes from the newest complete one.

Every rank writes its part of a DeepSpeed checkpoint (ZeRO-3 partitions, optimizer states); a rank killed
halfway leaves a checkpoint that DeepSpeed would load and fail on, or worse, load. :func:`save_complete`
writes step ``N`` under the tag ``stepN.partial``; once every rank has written its files (a barrier), rank 0
renames the directory to ``stepN``, which is atomic on one file system. :func:`load_newest_complete` only
considers ``stepN`` directories, so a ``.partial`` one, whatever it holds, is never loaded. ``save_dir`` must
be one file system that every rank sees (a shared file system across nodes).
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Any, Dict, List, NamedTuple, Optional

import torch.distributed as dist

_COMPLETE = re.compile(r"^step(\d+)$")
PARTIAL_SUFFIX = ".partial"


class Resumed(NamedTuple):
    """A loaded checkpoint: the step it was saved after, its directory, and the ``client_state`` saved with it."""

    step: int
    path: str
    client_state: Dict[str, Any]


def complete_steps(save_dir: str) -> List[int]:
    """Steps of the complete checkpoints in ``save_dir``, ascending (``.partial`` directories excluded)."""
    if not os.path.isdir(save_dir):
        return []
    found = (_COMPLETE.match(name) for name in os.listdir(save_dir))
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(save_dir, m.group(0))))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_complete(engine, save_dir: str, step: int, client_state: Optional[Dict[str, Any]] = None) -> str:
    """Save ``engine``'s checkpoint after ``step`` as ``save_dir/step<step>``, which exists only once every
    rank has written all of it. Collective: every rank calls it. Returns the checkpoint's path."""
    tag = f"step{step}"
    partial = os.path.join(save_dir, tag + PARTIAL_SUFFIX)
    final = os.path.join(save_dir, tag)
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving this step
    _barrier()
    engine.save_checkpoint(save_dir, tag=tag + PARTIAL_SUFFIX, client_state=dict(client_state or {}, step=step),
                           save_latest=False)
    _barrier()  # every rank's files are written (and closed) before the checkpoint is declared complete
    if _rank() == 0:
        if os.path.isdir(final):  # an older copy of the same step (a resumed run saving it again)
            shutil.rmtree(final)
        os.rename(partial, final)
    _barrier()
    return final


def load_newest_complete(engine, save_dir: str, **load_kwargs) -> Optional[Resumed]:
    """Load the newest complete checkpoint of ``save_dir`` into ``engine`` (``None`` when there is none).
    Collective: every rank calls it and sees the same directory listing (rank 0's, shared)."""
    steps: List[Any] = [complete_steps(save_dir) if _rank() == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(steps, src=0)  # one decision even while a save's rename is in flight elsewhere
    if not steps[0]:
        return None
    step = steps[0][-1]
    path = os.path.join(save_dir, f"step{step}")
    loaded, client_state = engine.load_checkpoint(save_dir, tag=f"step{step}", **load_kwargs)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the complete checkpoint {path}")
    return Resumed(step, path, client_state or {})


__all__ = ["PARTIAL_SUFFIX", "Resumed", "complete_steps", "load_newest_complete", "save_complete"]
