"""The README's main job: ``deepspeed --num_gpus 2 examples/train.py --deepspeed_config <cpu template>``.

Run as the README says (the DeepSpeed launcher, 2 CPU ranks), with fewer steps and a shorter sequence.
"""
from __future__ import annotations

import functools
import math
import os
import re
import shutil
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)  # the plain run serves both tests: one launch of it
def run_example(*extra: str) -> str:
    launcher = shutil.which("deepspeed")
    cmd = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--num_gpus", "2", "--master_port", str(free_port()), "examples/train.py",
            "--deepspeed_config", "ds_config_templates/cpu_smoke.json",
            "--steps", "12", "--seq_len", "1024", "--log_every", "4", "--corpus_mb", "2", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_train_example_runs_under_the_deepspeed_launcher_and_learns():
    out = run_example()

    assert "2 ranks = dp 1 x ring 2 x ulysses 1, seq_len 1024 (512 tokens per rank)" in out
    steps = re.findall(r"step\s+(\d+)\s+loss ([\d.]+)\s+([\d,]+) tok/s\s+mem ([\d.]+) GB", out)
    assert [int(s[0]) for s in steps] == [4, 8, 12]
    assert all(float(s[2].replace(",", "")) > 0 and float(s[3]) > 0 for s in steps)
    assert "12/12" in out  # the progress bar reached the end
    done = re.search(r"done: 12 steps .* loss ([\d.]+) -> ([\d.]+), held-out loss ([\d.]+)", out)
    assert done, out[-4000:]
    first, last, held_out = map(float, done.groups())
    uniform = math.log(256)
    # it learns, on text it has not trained on too (at initialization the model already guesses "the same
    # byte again", which the whitespace of source code rewards, so the first loss starts below uniform)
    assert last < first - 0.5 and held_out < uniform - 1.0, done.group(0)


def test_train_example_with_checkpointing_keeps_the_attention_and_learns_the_same():
    plain = re.search(r"done: 12 steps .* loss ([\d.]+) -> ([\d.]+)", run_example())
    out = run_example("--checkpointing")
    assert "activation checkpointing on, attention outputs kept" in out
    done = re.search(r"done: 12 steps .* loss ([\d.]+) -> ([\d.]+)", out)
    assert done and plain, out[-4000:]
    # recomputing the layers changes no value: the same losses as without checkpointing (printed to 4 digits)
    assert done.groups() == plain.groups()
