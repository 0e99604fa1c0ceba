"""After ``import ds_longctx``, ``deepspeed.initialize`` sets up what the ``long_context`` block asks for.

The hooked call trains exactly like ``ds_longctx.initialize`` whichever way the config is given; a config
without the block gets DeepSpeed's own behaviour; ``DS_LONGCTX_DEEPSPEED_HOOK=0`` leaves DeepSpeed alone.
Training runs on the session's 2-rank pool (ring 2, ZeRO-3); installation is probed in fresh processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import deepspeed_cases, deepspeed_hook_cases as cases

WORLD = 2
STEPS = 3
SEQ = 32
BATCH = 2
RTOL = 1e-5  # fp32, as in test_deepspeed_integration
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pool(dist_pools):
    return dist_pools(WORLD)


def train(pool, tmp_path, initializer, form, block=True):
    return pool.run(cases.train_through, initializer, form, str(tmp_path), STEPS, SEQ, BATCH, block=block,
                    timeout=300)


def test_hooked_deepspeed_initialize_trains_exactly_like_ds_longctx_initialize(pool, tmp_path):
    explicit = train(pool, tmp_path, "ds_longctx", "dict")
    reference = deepspeed_cases.train_single_process("llama", 1, STEPS, SEQ, BATCH)["losses"]
    assert explicit[0]["losses"] == pytest.approx([step[0] for step in reference], rel=RTOL)
    assert len(set(explicit[0]["losses"])) == STEPS  # the losses move: equal runs are not equal by being constant
    log_lines = []
    for form in cases.FORMS:
        hooked = train(pool, tmp_path, "deepspeed", form)
        for rank, (mine, theirs) in enumerate(zip(hooked, explicit)):
            assert mine["has_long_context"] and mine["sp"] == WORLD, (form, rank)
            assert mine["attn_impl"] == "ds_longctx", (form, rank)
            assert mine["losses"] == theirs["losses"], (form, rank)  # one code path: the same bits
            log_lines.append((rank, mine["announced_before"], mine["hook_log"]))
    # one line, on rank 0, the first time this process routes a config (the pool's workers live on)
    assert all(lines == [] for rank, _, lines in log_lines if rank != 0)
    rank0 = [(before, lines) for rank, before, lines in log_lines if rank == 0]
    assert sum(len(lines) for _, lines in rank0) == (0 if rank0[0][0] else 1)
    assert all(len(lines) == 0 for before, lines in rank0 if before)
    if not rank0[0][0]:
        assert "deepspeed.initialize sets the engine up through ds_longctx.initialize" in rank0[0][1][0]


@pytest.mark.parametrize("form", ["args"])
def test_config_without_the_block_gets_deepspeeds_own_behaviour(pool, tmp_path, form):
    own = train(pool, tmp_path, "deepspeed_own", form, block=False)
    hooked = train(pool, tmp_path, "deepspeed", form, block=False)
    for mine, theirs in zip(hooked, own):
        assert not mine["has_long_context"] and mine["attn_impl"] == theirs["attn_impl"] != "ds_longctx"
        assert mine["hook_log"] == []
        assert mine["losses"] == theirs["losses"]
    assert hooked[0]["losses"] != hooked[1]["losses"]  # plain data parallelism: each rank its own sequences


@pytest.mark.parametrize("case,expect", [
    ("degrees", "does not divide the world size 2"),
    # code that bound DeepSpeed's function before importing ds_longctx: refused, not silently ignored
    ("stale_reference", "engine is being built by DeepSpeed's own initialize, which ignores the block")])
def test_a_block_reaching_deepspeed_raises_ds_longctx_errors_on_every_rank(pool, case, expect):
    raised = pool.run(cases.initialize_error_through_hook, case, timeout=120)
    assert len(set(raised)) == 1 and raised[0].startswith("LongContextConfigError"), raised
    assert expect in raised[0], raised


def probe(tmp_path, order, opt_out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DS_LONGCTX_DEEPSPEED_HOOK", None)
    if opt_out:
        env["DS_LONGCTX_DEEPSPEED_HOOK"] = "0"
    proc = subprocess.run([sys.executable, "-m", "tests.deepspeed_hook_cases", order, str(tmp_path / "init")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", ["ds_longctx_first", "deepspeed_first"])
def test_importing_ds_longctx_hooks_deepspeed_initialize_once_in_either_order(tmp_path, order):
    seen = probe(tmp_path, order, opt_out=False)
    assert seen == {"light_import": True if order == "ds_longctx_first" else None, "hook_installed": True,
                    "reinstalled": True, "same_function_after_reinstall": True, "wraps_deepspeeds_own": True,
                    "has_long_context": True}


def test_opt_out_leaves_deepspeed_initialize_untouched(tmp_path):
    seen = probe(tmp_path, "ds_longctx_first", opt_out=True)
    assert seen == {"light_import": True, "hook_installed": False, "reinstalled": False,
                    "same_function_after_reinstall": True, "wraps_deepspeeds_own": False,
                    "has_long_context": False}
