"""Crash and resume of ``examples/train.py`` (2 CPU ranks under the DeepSpeed launcher, ZeRO-3, activation
checkpointing with kept attention outputs, FPDT chunks with host offload, checkpoint offload, MLP tiles):
a rank killed with SIGKILL stops the run; the same command continues from the newest complete checkpoint,
never from a half-written one, and from there its losses equal those of a run never interrupted.

The run before the kill is that uninterrupted run up to the kill: the kill comes two steps after a
checkpoint, so the resumed run recomputes those two steps (same weights, optimizer state, LR schedule and
data position, or the losses differ). Two launches instead of three keep the test affordable on CI's CPUs."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil

from tests.test_example import ROOT, free_port

STEPS, SAVE_EVERY, KILL_AFTER = 8, 4, 6  # the kill lands two steps before the next save
BLOCK = {"ulysses_degree": 1, "ring_degree": 2, "kernel": "auto", "fpdt": {"chunk_size": 64, "offload": True},
         "checkpoint_offload": True, "mlp_tile_tokens": 64, "timeout_s": 60}


def _command(tmp_path, save_dir: str, metrics: str):
    with open(os.path.join(ROOT, "ds_config_templates", "cpu_smoke.json")) as f:
        config = json.load(f)
    config["long_context"] = BLOCK
    config_path = tmp_path / "ds_config.json"
    config_path.write_text(json.dumps(config))
    launcher = shutil.which("deepspeed")
    cmd = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return cmd + ["--num_gpus", "2", "--master_port", str(free_port()), "examples/train.py",
                  "--deepspeed_config", str(config_path), "--steps", str(STEPS), "--seq_len", "512",
                  "--corpus_mb", "1", "--log_every", "0", "--checkpointing", "--save_dir", save_dir,
                  "--save_every", str(SAVE_EVERY), "--metrics", metrics]


def _run(cmd) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def _losses(path) -> dict:
    """step -> loss, the last line of a step winning (a resumed run repeats the steps after its checkpoint)."""
    with open(path) as f:
        return {rec["step"]: rec["loss"] for rec in map(json.loads, f)}


def _kill_rank_1_after_step(launcher: subprocess.Popen, metrics: str, step: int) -> None:
    deadline = time.monotonic() + 240
    while not (os.path.exists(metrics) and any(s >= step for s in _losses(metrics))):
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == "1" and "examples/train.py" in " ".join(child.cmdline()):
                os.kill(child.pid, signal.SIGKILL)
                return
        except psutil.Error:
            continue
    raise AssertionError("rank 1 not found among the launcher's processes")


def test_a_run_killed_by_sigkill_resumes_from_the_last_complete_checkpoint_with_the_same_losses(tmp_path):
    save_dir, metrics = str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl")
    cmd = _command(tmp_path, save_dir, metrics)
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        _kill_rank_1_after_step(launcher, metrics, KILL_AFTER)
        launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    complete = sorted(int(m.group(1)) for m in map(re.compile(r"^step(\d+)$").match, os.listdir(save_dir)) if m)
    assert complete == [SAVE_EVERY], os.listdir(save_dir)
    newest = complete[-1]
    uninterrupted = _losses(metrics)
    assert sorted(uninterrupted)[:KILL_AFTER] == list(range(1, KILL_AFTER + 1)) and max(uninterrupted) < STEPS

    # What a kill in the middle of a save leaves: a newer checkpoint, half written, with a "latest" pointing to it.
    half = os.path.join(save_dir, f"step{STEPS - 1}.partial")
    shutil.copytree(os.path.join(save_dir, f"step{newest}"), half)
    for name in os.listdir(half):
        with open(os.path.join(half, name), "r+b") as f:
            f.truncate(16)
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(f"step{STEPS - 1}.partial")

    out = _run(cmd)
    assert f"resumed from {os.path.join(save_dir, f'step{newest}')} after step {newest}" in out, out[-3000:]
    resumed = _losses(metrics)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # the steps run again after the resume give the uninterrupted run's losses, exactly
    again = range(newest + 1, KILL_AFTER + 1)
    assert len(again) == 2
    assert [resumed[s] for s in again] == [uninterrupted[s] for s in again], (resumed, uninterrupted)
    assert all(math.isfinite(resumed[s]) for s in resumed)
    # the resumed run goes on saving complete checkpoints; the half-written one was never renamed into place
    assert sorted(n for n in os.listdir(save_dir) if n.startswith("step")) == \
        [f"step{SAVE_EVERY}", f"step{STEPS - 1}.partial", f"step{STEPS}"]
