"""``ds-longctx validate``: the resolved block and exit 0, or what is wrong and exit 1."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ds_longctx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "ds_config_templates")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path, cfg) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_valid_config_prints_the_resolved_block(capsys):
    code, out, err = run(capsys, "validate", os.path.join(TEMPLATES, "hybrid_fpdt_offload.json"))
    assert code == 0
    assert json.loads(out) == {"long_context": {"ulysses_degree": 4, "ring_degree": 2,
                                                "fpdt": {"chunk_size": 16384, "offload": True},
                                                "kernel": "auto", "causal": True, "keep_attention_output": True,
                                                "checkpoint_offload": True, "checkpoint_layers": None, "checkpoint_every": 1,
                                                "mlp_tile_tokens": 16384, "loss_tile_tokens": None,
                                                    "lean_rms_norm": True, "fused_norms": False, "fused_gated_mlp": False, "fused_rope": False, "host_optimizer_states": False,
                                                "load_balance": "zigzag", "seq_len": None, "preflight": True,
                                                "timeout_s": None}}


def test_a_valid_block_says_which_calls_read_it(capsys, monkeypatch):
    monkeypatch.delenv("DS_LONGCTX_DEEPSPEED_HOOK", raising=False)
    code, out, err = run(capsys, "validate", os.path.join(TEMPLATES, "cpu_smoke.json"))
    assert code == 0
    assert "so does deepspeed.initialize" in err and "in a process that has imported ds_longctx" in err
    assert "never imports ds_longctx, DeepSpeed ignores the block: no engine.long_context" in err
    assert "DS_LONGCTX_DEEPSPEED_HOOK" not in err
    monkeypatch.setenv("DS_LONGCTX_DEEPSPEED_HOOK", "0")
    code, out, err = run(capsys, "validate", os.path.join(TEMPLATES, "cpu_smoke.json"))
    assert code == 0
    assert "DS_LONGCTX_DEEPSPEED_HOOK=0 is set here: deepspeed.initialize leaves the block to DeepSpeed" in err


def test_auto_values_are_said_to_resolve_from_seq_len_or_the_first_batch(capsys, tmp_path):
    code, out, err = run(capsys, "validate", write(tmp_path, {"long_context": {"mlp_tile_tokens": "auto"}}))
    assert code == 0 and json.loads(out)["long_context"]["mlp_tile_tokens"] == "auto"
    assert "note: mlp_tile_tokens are \"auto\"" in err
    assert "without either, the first batch through engine.long_context.shard_batch" in err
    code, out, err = run(capsys, "validate", write(tmp_path, {"long_context": {"mlp_tile_tokens": "auto",
                                                                                "seq_len": 4096}}))
    assert code == 0 and "for long_context.seq_len = 4096" in err and "first batch" not in err


def test_defaults_are_filled_in_and_a_missing_block_is_pointed_out(capsys, tmp_path):
    code, out, err = run(capsys, "validate", write(tmp_path, {"train_micro_batch_size_per_gpu": 1}))
    assert code == 0
    assert json.loads(out)["long_context"]["ulysses_degree"] == 1
    assert "has no long_context block" in err


def test_invalid_block_names_the_field_and_exits_1(capsys, tmp_path):
    path = write(tmp_path, {"long_context": {"ulysses_degree": 0, "fpdt": {"chunk": 4}}})
    code, out, err = run(capsys, "validate", path)
    assert code == 1 and out == ""
    assert path in err
    assert "long_context.ulysses_degree: Input should be greater than 0 (got 0)" in err
    assert "long_context.fpdt.chunk: unknown key; did you mean 'chunk_size'?" in err


def test_run_checks_report_every_problem(capsys):
    code, out, err = run(capsys, "validate", os.path.join(TEMPLATES, "hybrid.json"),
                         "--world-size", "12", "--heads", "2", "--kv-heads", "2", "--seq-len", "100")
    assert code == 1 and out == ""
    assert "3 problem(s)" in err
    assert "does not divide the world size 12" in err
    assert "exceeds the model's 2 query heads" in err
    assert "sequence length 100 is not divisible by 8" in err


def test_run_checks_that_pass_describe_the_layout(capsys):
    code, out, err = run(capsys, "validate", os.path.join(TEMPLATES, "hybrid.json"),
                         "--world-size", "16", "--heads", "32", "--kv-heads", "8", "--seq-len", "131072")
    assert code == 0
    assert "world 16 = data-parallel 2 x ring 2 x ulysses 4" in err


def test_missing_file_exits_1(capsys):
    code, out, err = run(capsys, "validate", "/nonexistent/ds_config.json")
    assert code == 1 and "does not exist" in err


@pytest.mark.parametrize("args,code", [(["validate", "TEMPLATE"], 0), (["validate", "BAD"], 1)])
def test_installed_script_exit_status(tmp_path, args, code):
    # The `ds-longctx` console script of an installed checkout, else the module it points to.
    exe = shutil.which("ds-longctx")
    cmd = [exe] if exe else [sys.executable, "-m", "ds_longctx.cli"]
    bad = write(tmp_path, {"long_context": {"ring_degree": -1}})
    argv = [a.replace("TEMPLATE", os.path.join(TEMPLATES, "cpu_smoke.json")).replace("BAD", bad) for a in args]
    proc = subprocess.run(cmd + argv, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == code, proc.stderr
    if code == 0:
        assert json.loads(proc.stdout)["long_context"]["ring_degree"] == 2
    else:
        assert "long_context.ring_degree" in proc.stderr
