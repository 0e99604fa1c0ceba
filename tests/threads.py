"""Counting a process's threads for the leak tests."""
from __future__ import annotations

import os
import time


def persistent_threads(window_s: float = 0.5) -> int:
    """The process's threads that persist: the fewest seen over ``window_s``. A leaked group's threads stay for
    good, while gloo's and torch's short-lived workers (a destroyed group's still winding down, or one starting)
    come and go within it: a single reading counted them one time in two on a loaded machine."""
    fewest = len(os.listdir("/proc/self/task"))
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        time.sleep(0.02)
        fewest = min(fewest, len(os.listdir("/proc/self/task")))
    return fewest
