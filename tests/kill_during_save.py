"""Test harness only (tests/test_resume.py): run a training script in which one rank kills itself with SIGKILL
in the middle of writing a checkpoint, after the first of its files is on disk and before the others.

    DS_LONGCTX_TEST_KILL_DURING_SAVE=<rank>:<step> deepspeed ... tests/kill_during_save.py examples/train.py ...

The rank whose ``RANK`` is ``<rank>`` wraps ``torch.save`` (which DeepSpeed's checkpoint engine calls for every
file) so that its first file written under ``step<step>.partial`` is its last: the kill lands at a precise point
of the save, which a test polling the file system from outside could only hit by chance. The product code has
no hook for this."""
from __future__ import annotations

import os
import runpy
import signal
import sys

import torch

KILL_VARIABLE = "DS_LONGCTX_TEST_KILL_DURING_SAVE"


def _die_after_first_file_of(step: int) -> None:
    real_save = torch.save
    marker = f"step{step}.partial"

    def save_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if marker in str(f):
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die


def main() -> None:
    rank, step = (int(v) for v in os.environ[KILL_VARIABLE].split(":"))
    if int(os.environ["RANK"]) == rank:
        _die_after_first_file_of(step)
    script = next(a for a in sys.argv[1:] if a.endswith(".py"))
    # the launcher's --local_rank=N comes before the script: hand it on after the script, where it parses
    sys.argv = [script] + [a for a in sys.argv[1:] if a != script]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
