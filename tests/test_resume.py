"""Crash and resume of ``examples/train.py`` (2 CPU ranks under the DeepSpeed launcher, ZeRO-3, activation
checkpointing with kept attention outputs, FPDT chunks with host offload, checkpoint offload, MLP tiles):
a rank killed with SIGKILL stops the run; the same command continues from the newest complete checkpoint,
never from a half-written one, and from there its losses equal those of a run never interrupted.

The run before the kill is that uninterrupted run up to the kill: the kill comes two steps after a
checkpoint, so the resumed run recomputes those two steps (same weights, optimizer state, LR schedule and
data position, or the losses differ). Two launches instead of three keep the test affordable on CI's CPUs.

A kill in the middle of a save: on 4 ranks (Ulysses 2 x ring 2), rank 1 dies right after writing the first
file of a checkpoint (tests/kill_during_save.py arms it; the product code has no hook); the half-written
checkpoint is never loaded, the run resumes from the one before and repeats the lost steps exactly."""
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


def _command(tmp_path, save_dir: str, metrics: str, *, ranks: int = 2, block: dict = BLOCK, steps: int = STEPS,
             save_every: int = SAVE_EVERY, script: tuple = ("examples/train.py",)):
    with open(os.path.join(ROOT, "ds_config_templates", "cpu_smoke.json")) as f:
        config = json.load(f)
    config["long_context"] = block
    config_path = tmp_path / "ds_config.json"
    config_path.write_text(json.dumps(config))
    launcher = shutil.which("deepspeed")
    cmd = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return cmd + ["--num_gpus", str(ranks), "--master_port", str(free_port()), *script,
                  "--deepspeed_config", str(config_path), "--steps", str(steps), "--seq_len", "512",
                  "--corpus_mb", "1", "--log_every", "0", "--checkpointing", "--save_dir", save_dir,
                  "--save_every", str(save_every), "--metrics", metrics]


def _run(cmd) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
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


# Every memory feature of BLOCK on 4 ranks, a Ulysses pair inside each ring position (U 2 x R 2). The kill in
# training is tested on 2 ranks above; this is the 4-rank run (one such launch pair is what CI can afford).
HYBRID = dict(BLOCK, ulysses_degree=2)


def test_a_rank_killed_while_writing_a_checkpoint_leaves_it_unloaded_and_the_run_resumes_from_the_one_before(
        tmp_path):
    ranks, block = 4, HYBRID
    steps, save_every, killed_in = 4, 2, 4  # rank 1 dies in the save after step 4, one file of it written
    save_dir, metrics = str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl")
    resume = _command(tmp_path, save_dir, metrics, ranks=ranks, block=block, steps=steps, save_every=save_every)
    killed = _command(tmp_path, save_dir, metrics, ranks=ranks, block=block, steps=steps, save_every=save_every,
                      script=("tests/kill_during_save.py", "examples/train.py"))
    proc = subprocess.run(killed, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                                   DS_LONGCTX_TEST_KILL_DURING_SAVE=f"1:{killed_in}"))
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    half = os.path.join(save_dir, f"step{killed_in}.partial")
    assert _checkpoints(save_dir) == ["step2", f"step{killed_in}.partial"], os.listdir(save_dir)
    assert os.listdir(half), "the kill came before any file of the save was written"
    before_kill = _losses(metrics)
    assert sorted(before_kill) == list(range(1, killed_in + 1)), before_kill

    out = _run(resume)
    assert f"resumed from {os.path.join(save_dir, 'step2')} after step 2" in out, out[-3000:]
    resumed = _losses(metrics)
    assert sorted(resumed) == list(range(1, steps + 1))
    # steps 3 and 4 ran before the kill and again after the resume: the same losses, exactly
    assert [resumed[s] for s in (3, 4)] == [before_kill[s] for s in (3, 4)], (resumed, before_kill)
    assert all(math.isfinite(loss) for loss in resumed.values())
    assert _checkpoints(save_dir) == ["step2", "step4"]  # the half-written save was redone, complete


def _checkpoints(save_dir: str) -> list:
    return sorted(name for name in os.listdir(save_dir) if name.startswith("step"))
