"""DeepSpeed's long-sequence recipe (ALST) as the training bench runs it, the model presets, the plots and the
sweep driver of the comparison: on the CPU, against float64 references where there is something to compute."""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bench.alst import HostLedger, offload_checkpoints, shard_sequence, tile_loss, tile_mlps
from bench.models import PRESETS, llama_config, matmul_params, resolve_shape, run_model_name
from tests.test_example import ROOT, free_port

transformers = pytest.importorskip("transformers")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- model presets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,matmul", [
    # Llama-3.2-3B: the LM head is the embedding, a matmul all the same
    ("llama3.2-3b", 3_212_749_824, 3_212_749_824),
    ("llama3.1-8b", 8_030_261_248, 8_030_261_248 - 128256 * 4096),
])
def test_presets_build_the_published_models_and_count_their_matmul_parameters(name, params, matmul):
    shape = PRESETS[name]
    with torch.device("meta"):  # the full model's shapes without its memory
        model = transformers.LlamaForCausalLM(llama_config(shape, 8192))
    layer = model.model.layers[0]
    D = shape.hidden // shape.heads
    assert len(model.model.layers) == shape.layers and D == 128
    assert layer.self_attn.q_proj.weight.shape == (shape.heads * D, shape.hidden)
    assert layer.self_attn.k_proj.weight.shape == (shape.kv_heads * D, shape.hidden)
    assert layer.mlp.gate_proj.weight.shape == (shape.intermediate, shape.hidden)
    assert model.get_input_embeddings().weight.shape == (128256, shape.hidden)
    assert model.config.rope_parameters["rope_theta"] == 500000.0 and model.config.rms_norm_eps == 1e-5
    assert sum(p.numel() for p in model.parameters()) == params
    assert matmul_params(model) == matmul


def test_shape_flags_override_a_preset_and_the_default_shape_stays_the_old_one():
    sl = resolve_shape("llama3.1-8b", layers=4, hidden=None)
    assert sl == PRESETS["llama3.1-8b"].__class__(**{**PRESETS["llama3.1-8b"].__dict__, "layers": 4})
    assert run_model_name({"model": "llama3.1-8b", "layers": 4}) == "llama3.1-8b, 4 layers"
    assert run_model_name({"model": "llama3.2-3b", "layers": 28}) == "llama3.2-3b"
    old = resolve_shape(None)
    assert (old.layers, old.hidden, old.intermediate, old.heads, old.kv_heads, old.vocab) == (4, 4096, 14336, 32, 8,
                                                                                              256)
    assert resolve_shape(None, tie_word_embeddings=1).tie_word_embeddings is True
    with pytest.raises(ValueError, match="llama3.2-3b"):
        resolve_shape("llama-7b")


def test_the_bench_records_the_preset_shape_it_runs():
    from bench.bench_train import parse_args

    args, shape = parse_args(["--model", "llama3.2-3b", "--layers", "8", "--mode", "alst", "--checkpointing",
                              "--out", "x.json"])
    assert (args.layers, args.hidden, args.heads, args.vocab, args.tie_word_embeddings) == (8, 3072, 24, 128256, True)
    assert args.label == "alst" and shape.layers == 8
    with pytest.raises(SystemExit):  # ALST is checkpointing with offloaded checkpoints: refused without it
        parse_args(["--mode", "alst", "--out", "x.json"])


# ---- the recipe in one process ------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_alst_recipe_has_the_float64_loss_and_gradients_of_the_plain_model(tied):
    shape = resolve_shape(None, layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=50,
                          tie_word_embeddings=int(tied))
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(llama_config(shape, 128)).double().train()
    model = copy.deepcopy(ref)
    S = 96
    ids = torch.randint(0, shape.vocab, (1, S))
    logits = ref(input_ids=ids).logits  # whole logits (transformers' own loss would cast them to fp32)
    ref_loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    ref_loss.backward()

    model.gradient_checkpointing_enable()
    ledger = HostLedger()
    assert offload_checkpoints(model, ledger) == 2 and tile_mlps(model) == 2  # 3 MLP tiles: 96 tokens / 32
    tile_loss(model, sp_group=None, tile_gib=S * shape.vocab * 4 / 2 ** 30 / 3.5)  # 4 loss tiles, the last short
    out = model(**shard_sequence(ids, 0, 1))
    # each checkpointed layer's input waits in host memory, and nothing else
    assert ledger.held == 2 * S * shape.hidden * 8
    out.loss.backward()
    assert ledger.held == 0 and ledger.peak == 2 * S * shape.hidden * 8

    assert out.mean_loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)  # one rank: its part is the whole
    params = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert rel(params[name].grad, p.grad) < 1e-10, name


def test_tiled_loss_divided_after_its_tiles_leaves_the_head_gradient_scaled_by_the_labelled_count():
    # ArcticTraining's use of TiledFusedLogitsLoss (sum the tiles, divide afterwards): the function computes
    # its parameters' gradients in forward for an incoming gradient of 1, so the division never reaches the
    # LM head's. The bench's recipe has the tiles return the loss itself (test above).
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False).double()
    owner = torch.nn.Module()
    owner.lm_head = head
    x = torch.randn(1, 64, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (1, 64))
    y[0, -1] = -100

    def tile_sum(m, xs, ys):
        return torch.nn.functional.cross_entropy(m.lm_head(xs), ys, ignore_index=-100, reduction="sum")

    (TiledFusedLogitsLoss.apply(tile_sum, owner, x, y, None, 4, [head.weight], "sum") / 63).backward()
    tiled = head.weight.grad.clone()
    head.weight.grad = None
    torch.nn.functional.cross_entropy(head(x[0]), y[0], ignore_index=-100).backward()
    assert rel(tiled, 63 * head.weight.grad) < 1e-12


# ---- the bench on CPU ranks ---------------------------------------------------------------------------------

TINY = ["--seq_len", "256", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4",
        "--kv_heads", "2", "--tie_word_embeddings", "1", "--checkpointing", "--dtype", "float32",
        "--optimizer", "sgd", "--lr", "0.3", "--lr_warmup_steps", "0", "--steps", "3", "--warmup", "1"]


def launch(nproc: int, out: str, *args: str) -> dict:
    launcher = shutil.which("torchrun")
    cmd = [launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nproc_per_node", str(nproc), "--master_port", str(free_port()), "bench/bench_train.py", "--out", out,
            *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(out) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def reference_losses(steps: int = 3):
    """The bench's model, data and optimizer (SGD, clipping at 1, constant rate) in one float64 process."""
    from examples.train import load_corpus, sample_batch

    shape = resolve_shape(None, layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256,
                          tie_word_embeddings=1)
    torch.manual_seed(0)  # as the bench: the same initial weights
    model = transformers.LlamaForCausalLM(llama_config(shape, 256)).double().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    corpus, gen = load_corpus(8.0), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        b = sample_batch(corpus, 1, 256, gen)
        loss = model(input_ids=b["input_ids"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("world", [1, 2])
def test_alst_mode_trains_like_one_float64_process(tmp_path, world):
    # One rank: TiledMLP, the tiled loss, checkpoints in host memory. Two: also DeepSpeed's Ulysses attention.
    # The LM head is tied (Llama-3.2-3B's), and the loss runs in several tiles.
    d = launch(world, str(tmp_path / "a.json"), "--mode", "alst", "--alst_loss_tile_gib", "6e-5", *TINY)

    losses = [r["loss"] for r in d["steps"]]
    assert losses == pytest.approx(reference_losses(), rel=1e-5)
    assert max(losses) - min(losses) > 0.1  # the steps' updates move the losses: equal is not trivially equal
    a = d["alst"]
    assert (a["checkpoints_offloaded"], a["tiled_mlps"], a["ulysses"]) == (2, 2, world > 1)
    assert a["mlp_tiles"] == 4 // world and a["loss_tiles"] > 1
    assert ("ulysses_note" in a) == (world == 1)
    assert d["dp"] == 1 and d["flops_params"] == d["params"]  # tied: the head's matmul counts
    for r in d["steps"]:  # each layer's input [S / world, hidden] in fp32, given back by backward
        assert r["host_pinned_gib"] * 2 ** 30 == 2 * 256 // world * 64 * 4
        assert r["host_pinned_held_after_step_gib"] == 0
    s = d["summary"]
    assert s["steady_peak_gib"] == 0 and s["steady_host_pinned_gib"] * 2 ** 30 == 2 * 256 // world * 64 * 4


# ---- plots and the sweep driver -----------------------------------------------------------------------------

def _record(mode, seq_len, tokens_per_s=None, peak=None, oom_peak=None):
    d = {"mode": mode, "label": mode, "seq_len": seq_len, "model": "llama3.2-3b", "layers": 28, "hidden": 3072}
    if oom_peak is not None:
        d["oom"] = {"step": 0, "error": "CUDA out of memory", "peak_gib": oom_peak}
    else:
        d["summary"] = {"tokens_per_s": tokens_per_s, "tflops_per_gpu": 1.0, "peak_gib": peak + 1,
                        "steady_peak_gib": peak}
    return d


def test_plot_writes_rate_and_peak_pictures_with_out_of_memory_points(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plot import load_points, plot

    runs = [_record("alst", 65536, 900.0, 40.0), _record("alst", 131072, oom_peak=120.0),
            _record("ds_longctx", 65536, 1300.0, 20.0), _record("ds_longctx", 131072, 1100.0, 35.0)]
    warm_only = _record("alst", 262144, 500.0, 60.0)  # its one step was a warm-up step: no steady rate
    warm_only.pop("summary")
    runs.append(warm_only)
    for i, d in enumerate(runs):
        (tmp_path / f"r{i}.json").write_text(json.dumps(d))
    points = load_points([str(tmp_path / "r*.json")])
    assert sorted((p.label, p.seq_len, p.tokens_per_s, p.peak_gib) for p in points) == [
        ("alst", 65536, 900.0, 40.0), ("alst", 131072, None, 120.0),
        ("ds_longctx", 65536, 1300.0, 20.0), ("ds_longctx", 131072, 1100.0, 35.0)]
    paths = plot(points, str(tmp_path / "pics" / "cmp"))
    assert [os.path.basename(p) for p in paths] == ["cmp_tokens_per_s.png", "cmp_gpu_peak.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_stops_a_variant_after_its_out_of_memory_and_skips_runs_predicted_past_the_budget():
    from bench.run_alst_compare import RunResult, predict_s, sweep

    now = [0.0]
    launched = []

    def launch(variant, seq_len, timeout_s):
        launched.append((variant, seq_len))
        if variant == "alst" and seq_len == 131072:
            return RunResult("oom", 50.0, [], "x.json", "gpu")
        step = 10.0 * (seq_len / 65536) ** 2
        now[0] += 30.0 + 3 * step
        return RunResult("ok", 30.0 + 3 * step, [step] * 3, "x.json")

    recs = sweep([262144, 65536, 131072], ["alst", "ds_longctx"], steps=3, budget_s=400.0, launch=launch,
                 clock=lambda: now[0])
    # 65536: 60 s each; 131072: both predicted 30 + 10 x 4 x 3 = 150 s, alst runs out of memory (no time),
    # ds_longctx takes 150 s; 262144: alst skipped (out of memory before), ds_longctx predicted
    # 30 + 40 x 4 x 3 = 510 s, past the 130 s left
    assert launched == [("alst", 65536), ("ds_longctx", 65536), ("alst", 131072), ("ds_longctx", 131072)]
    status = {(r["variant"], r["seq_len"]): r["status"] for r in recs}
    assert status == {("alst", 65536): "ok", ("ds_longctx", 65536): "ok", ("alst", 131072): "oom",
                      ("ds_longctx", 131072): "ok", ("alst", 262144): "skipped",
                      ("ds_longctx", 262144): "over_budget"}
    last = recs[-1]
    assert last["predicted_s"] == pytest.approx(510.0) and last["left_s"] == pytest.approx(130.0)
    assert predict_s(RunResult("ok", 100.0, [10.0, 20.0], None), 1000, 2000, 3) == pytest.approx(70 + 20 * 4 * 3)


def test_a_rank_killed_by_sigkill_is_recorded_as_killed_and_stops_the_variant():
    from bench.run_alst_compare import RunResult, failure, sweep

    torchrun_stderr = "torch.distributed.elastic...: Signal 9 (SIGKILL) received by PID 4242"
    assert failure(1, torchrun_stderr)[0] == "killed" and "out-of-memory killer" in failure(1, torchrun_stderr)[1]
    assert failure(-9, "")[0] == "killed"
    assert failure(1, "ValueError: bad flag") == ("failed", "rc 1: ValueError: bad flag")

    def launch(variant, seq_len, timeout_s):
        if seq_len == 131072:
            return RunResult(*failure(1, torchrun_stderr)[:1], 5.0, [], None, "")
        return RunResult("ok", 10.0, [1.0], "x.json")

    recs = sweep([65536, 131072, 262144], ["alst"], steps=1, budget_s=1e6, launch=launch, clock=lambda: 0.0)
    assert [r["status"] for r in recs] == ["ok", "killed", "skipped"]


def test_report_lists_each_length_and_the_longest_trained_per_run():
    from bench.report import long_sequence_tables

    rows = []
    for i, d in enumerate([_record("alst", 65536, 900.0, 40.0), _record("alst", 131072, oom_peak=120.0),
                           _record("ds_longctx", 65536, 1300.0, 20.0), _record("ds_longctx", 131072, 1100.0, 35.0)]):
        d.update(params=3.2e9, vocab=128256, world_size=1, steps=[{"loss": 5.5}], date="d", command="c", commit="x",
                 versions={"torch": "t"})
        rows.append((f"alstcmp_{i}.json", d))
    text = "\n".join(long_sequence_tables(rows))
    assert "**llama3.2-3b** (3.20B parameters, vocabulary 128256, 1 GPU)" in text
    assert "| alst | 131072 | OOM (gpu, step 0, 120.0 GiB) |" in text
    assert "| ds_longctx | 131072 | 1,100 | 1.0 | 35.0 |" in text
    assert "| alst | 65536 | 131072 |" in text and "| ds_longctx | 131072 | none run |" in text
    # against ALST only where both trained: 1300/900 = 1.44x the rate, 20/40 = 0.50x the peak
    assert "| ds_longctx | 65536 | 1.44x (met) | 0.50x (met) |" in text and "| ds_longctx | 131072 | 1." not in text


def test_report_shows_a_run_of_warm_up_steps_only_as_its_first_step_and_compares_it_with_nothing():
    from bench.report import long_sequence_tables

    rows = []
    for i, d in enumerate([_record("alst", 262144, 500.0, 60.0), _record("ds_longctx", 262144, 2800.0, 50.0)]):
        d.update(params=3.2e9, vocab=128256, world_size=1, date="d", command="c", commit="x", versions={"torch": "t"},
                 steps=[{"loss": 5.5, "seconds": 155.9, "tokens_per_s": 1681.5, "peak_gib": 55.3}])
        rows.append((f"alstcmp_{i}.json", d))
    rows[0][1].pop("summary")
    text = "\n".join(long_sequence_tables(rows))
    assert "| alst | 262144 | first step only: 155.9 s (1,682 tokens/s, warm-up included) |" in text
    assert "| alst | 262144 | none run |" in text  # it trained its one step
    assert "vs ALST" not in text


def test_report_counts_a_launch_killed_by_sigkill_as_the_first_length_out_of_memory():
    from bench.report import long_sequence_tables

    rows = []
    for i, d in enumerate([_record("alst", 65536, 900.0, 40.0), _record("alst", 131072, 800.0, 60.0)]):
        d.update(params=3.2e9, vocab=128256, world_size=1, steps=[{"loss": 5.5, "seconds": 3.0}], date="d",
                 command="c", commit="x", versions={"torch": "t"})
        rows.append((f"alstcmp_{i}.json", d))
    killed = rows[1][1]
    killed.pop("summary")
    killed["partial"] = True  # the record as bench_train left it when its process was killed
    text = "\n".join(long_sequence_tables(rows, launches={"alstcmp_1.json": {"status": "killed"}}))
    assert "| alst | 131072 | killed in step 1 (SIGKILL, no Python error: host memory full) |" in text
    assert "| alst | 65536 | 131072 |" in text
    # stopped from outside (a device call's end) instead: neither killed nor out of memory
    text = "\n".join(long_sequence_tables(rows, launches={"alstcmp_1.json": {"status": "timeout"}}))
    assert "| alst | 131072 | stopped after 1 step(s) of 3 s |" in text and "| alst | 65536 | none run |" in text


def test_planned_variants_train_the_configuration_the_planner_chooses_for_each_length(tmp_path):
    import argparse

    from bench.run_alst_compare import VARIANTS, make_planner, variant_flags

    args = argparse.Namespace(model="llama3.2-3b", layers=None, gpus=1, out_dir=str(tmp_path), prefix="t",
                              plan_flags="--gpu-memory-gib 139.8 --host-memory-gib 120")
    planned = make_planner(args)
    flags = variant_flags(VARIANTS["ds_longctx_plan"], 262144, planned)

    with open(tmp_path / "tplan_llama3.2-3b_262144.json") as f:
        plan = json.load(f)
    block = plan["ds_config"]["long_context"]
    assert plan["fits"] and plan["seq_len"] == 262144
    assert flags[:3] == ["--mode", "ds_longctx", "--checkpointing"] and flags[-2:] == ["--kernel", "sdpa_cudnn"]
    if block["fpdt"]["chunk_size"]:
        assert flags[flags.index("--chunk_size") + 1] == str(block["fpdt"]["chunk_size"])
    assert ("--offload" in flags) == block["fpdt"]["offload"]
    assert flags[flags.index("--keep_attention_output") + 1] == str(int(block["keep_attention_output"]))
    args.plan_flags = "--gpu-memory-gib 8 --host-memory-gib 8"  # a 3B model's states alone need more
    with pytest.raises(RuntimeError, match="ds-longctx plan"):
        planned(262144)


def test_a_run_measured_earlier_is_not_launched_again(tmp_path):
    import argparse

    from bench.run_alst_compare import VARIANTS, make_launcher

    have, out = tmp_path / "have", tmp_path / "out"
    have.mkdir()
    out.mkdir()
    with open(have / "alstcmp_alst_llama3.2-3b_262144.json", "w") as f:
        json.dump({"steps": [{"seconds": 120.0}, {"seconds": 100.0}]}, f)
    with open(have / "alstcmp_deepspeed_llama3.2-3b_262144.json", "w") as f:  # stopped early: run again
        json.dump({"steps": [{"seconds": 120.0}], "partial": True}, f)
    args = argparse.Namespace(model="llama3.2-3b", layers=None, gpus=1, out_dir=str(out), prefix="alstcmp",
                              plan_flags="", have=str(have), steps=2, warmup=1, commit="", extra="",
                              alloc_conf="", dry_run=True)
    launch = make_launcher(args, VARIANTS)

    earlier = launch("alst", 262144, 100.0)
    assert earlier.status == "ok" and earlier.note == "measured earlier" and earlier.step_seconds == [120.0, 100.0]
    assert earlier.wall_s == 280.0 and earlier.path == str(have / "alstcmp_alst_llama3.2-3b_262144.json")
    assert launch("deepspeed", 262144, 100.0).note == "dry run"


def test_the_lean_variant_plans_within_a_share_of_alsts_measured_peak_and_needs_alst_first(tmp_path):
    import argparse

    from bench.run_alst_compare import ALST_SHARE, VARIANTS, make_launcher

    out = tmp_path / "out"
    out.mkdir()
    args = argparse.Namespace(model="llama3.2-3b", layers=None, gpus=1, out_dir=str(out), prefix="alstcmp",
                              plan_flags="--host-memory-gib 120", have="", steps=2, warmup=1, commit="",
                              extra="", alloc_conf="", dry_run=False)
    launch = make_launcher(args, VARIANTS)
    missing = launch("ds_longctx_lean", 65536, 100.0)
    assert missing.status == "failed" and "run the alst variant first" in missing.note

    with open(out / "alstcmp_alst_llama3.2-3b_65536.json", "w") as f:
        json.dump({"summary": {"steady_peak_gib": 100.0}, "steps": []}, f)
    from bench.run_alst_compare import make_planner, variant_flags
    flags = variant_flags(VARIANTS["ds_longctx_lean"], 65536, make_planner(args),
                          lambda seq_len: json.load(open(out / f"alstcmp_alst_llama3.2-3b_{seq_len}.json"))
                          ["summary"]["steady_peak_gib"])
    with open(out / "alstcmpplan_llama3.2-3b_65536_within_alst.json") as f:
        plan = json.load(f)
    assert plan["fits"] and plan["machine"]["gpu_memory_gib"] == pytest.approx(ALST_SHARE * 100.0, abs=0.01)
    assert plan["gpu_peak_gib"] <= ALST_SHARE * 100.0
    assert plan["ds_config"]["long_context"]["kernel"] == "sdpa_cudnn" and flags[-2:] == ["--kernel", "sdpa_cudnn"]


def test_report_shows_a_models_pictures_where_the_plot_drew_them(tmp_path, monkeypatch):
    import bench.report_long as report_long

    monkeypatch.setattr(report_long, "DOCS", str(tmp_path))
    assert report_long.pictures("llama3.2-3b") == []
    for kind in ("tokens_per_s", "gpu_peak"):
        (tmp_path / f"alst_llama3.2-3b_{kind}.png").write_bytes(b"png")
    assert report_long.pictures("llama3.2-3b") == [
        "![tokens/s against sequence length, llama3.2-3b](alst_llama3.2-3b_tokens_per_s.png)\n",
        "![GPU peak against sequence length, llama3.2-3b](alst_llama3.2-3b_gpu_peak.png)\n"]
    assert report_long.pictures("llama3.1-8b") == []
