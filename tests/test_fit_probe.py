"""The fit probe (``bench_train.py --probe_layers K``, ``bench/fit_probe.py``): a step stopped after K decoder
layers' backward. On the CPU memory reads 0, so these check the mechanics that make its peak the step's: the
stop comes after exactly K layers' backward with their gradients complete and none of the earlier layers',
the forward is the whole step's (its loss equals a float64 reference's full step), no optimizer step
follows, and the run writes its record and exits cleanly in every mode."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from bench.fit_probe import FitProbe, ProbeStop, decoder_layers, probe_summary, step_plan
from bench.models import llama_config, resolve_shape
from tests.test_bench_alst import launch

transformers = pytest.importorskip("transformers")

SHAPE = dict(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, tie_word_embeddings=1)


def tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(resolve_shape(None, **SHAPE), 256)).to(dtype).train()


def layer_grads(model):
    """Per decoder layer: whether each of its parameters has a gradient."""
    return [[p.grad is not None for p in layer.parameters()] for layer in decoder_layers(model)]


# ---- the probe in one process -------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpointing", ["none", "non-reentrant", "reentrant", "alst"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_probe_stops_the_backward_after_exactly_k_layers_with_their_gradients_complete(checkpointing, k):
    model = tiny_model()
    if checkpointing != "none":
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    if checkpointing == "alst":  # the ALST recipe: checkpoints in host memory, TiledMLP, the tiled loss
        from bench.alst import HostLedger, offload_checkpoints, tile_loss, tile_mlps
        offload_checkpoints(model, HostLedger())
        tile_mlps(model)
        tile_loss(model, sp_group=None, tile_gib=1e-4)
    peaks = iter(range(100))
    probe = FitProbe(decoder_layers(model), k, peak_gib=lambda: float(next(peaks)))
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    probe.arm()
    assert probe.phase() == "forward"
    if checkpointing == "alst":
        from bench.alst import shard_sequence
        loss = model(**shard_sequence(ids, 0, 1)).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    probe.forward_done()
    assert probe.phase() == "backward of layer 3"  # the last layer's, with the loss's
    with pytest.raises(ProbeStop):
        loss.backward()

    rec = probe.record()
    assert rec["stopped_after_layer_backward"] == k and [d["layer"] for d in rec["layer_backwards"]] == [3, 2, 1, 0][:k]
    # each probed layer had all its gradients when its backward was counted; the earlier layers have none
    assert [d["params_with_gradient"] for d in rec["layer_backwards"]] == rec["params_per_layer"][:k]
    assert rec["layers_with_gradients"] == list(range(4 - k, 4))
    assert layer_grads(model) == [[i >= 4 - k] * 9 for i in range(4)]
    if checkpointing != "alst":  # (ALST's tiled loss gives the tied head its gradient in the forward)
        assert model.get_input_embeddings().weight.grad is None  # the embedding's backward never ran
    assert [d["peak_gib"] for d in rec["layer_backwards"]] == list(range(k))  # read at each layer's end
    assert probe.phase() == (f"backward of layer {3 - k}" if k < 4 else "backward after the layers")


def test_a_disarmed_probe_leaves_the_backward_whole_and_removes_its_hooks():
    model = tiny_model()
    model.gradient_checkpointing_enable()
    probe = FitProbe(decoder_layers(model), 2, peak_gib=lambda: 0.0)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()  # not armed: a whole step (the bench's warm-up)
    assert all(all(g) for g in layer_grads(model)) and probe.record()["stopped_after_layer_backward"] == 0
    probe.remove()
    model.zero_grad(set_to_none=True)
    probe.arm()  # no hooks left: nothing stops
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(all(g) for g in layer_grads(model))
    with pytest.raises(ValueError, match="between 1 and the model's 4 layers"):
        FitProbe(decoder_layers(model), 5, peak_gib=lambda: 0.0)


def test_out_of_memory_inside_a_layers_backward_is_placed_in_that_layer():
    model = tiny_model()
    model.gradient_checkpointing_enable()
    probe = FitProbe(decoder_layers(model), 4, peak_gib=lambda: 0.0)

    def fail(module, grad_output):
        raise MemoryError("host out of memory")
    decoder_layers(model)[1].mlp.register_full_backward_pre_hook(fail)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    probe.arm()
    loss = model(input_ids=ids, labels=ids).loss
    probe.forward_done()
    with pytest.raises(MemoryError):
        loss.backward()
    assert probe.phase() == "backward of layer 1"


def test_step_plan_warms_up_at_the_block_multiple_then_trains_or_probes():
    assert step_plan(seq_len=512, steps=3, probe_layers=0, warm_seq_len=0, multiple=1) == [(512, "train")] * 3
    assert step_plan(seq_len=512, steps=2, probe_layers=0, warm_seq_len=100, multiple=128) == [
        (128, "warm"), (512, "train"), (512, "train")]
    assert step_plan(seq_len=512, steps=1, probe_layers=2, warm_seq_len=0, multiple=128) == [(512, "probe")]
    assert step_plan(seq_len=512, steps=1, probe_layers=2, warm_seq_len=100, multiple=128) == [(128, "warm"),
                                                                                             (512, "probe")]
    rows = [{"peak_gib": 3.0, "seconds": 1.0, "tokens_per_s": 9.0, "warm_step": True},
            {"peak_gib": 5.0, "seconds": 7.0, "forward_peak_gib": 4.0, "layer_backward_peaks_gib": [5.0, 5.0],
             "probe": {"layers": 2}, "host_pinned_total_gib": 2.0}]
    s = probe_summary(rows)
    assert s == {"probe_peak_gib": 5.0, "probe_forward_peak_gib": 4.0, "probe_layer_backward_peaks_gib": [5.0, 5.0],
                 "probe_seconds": 7.0, "probe_layers": 2, "peak_gib": 5.0, "probe_host_pinned_total_gib": 2.0}
    assert probe_summary(rows[:1]) is None  # the probe ran out of memory: no summary


def test_the_bench_refuses_a_probe_it_cannot_run():
    from bench.bench_train import parse_args

    base = ["--mode", "deepspeed", "--layers", "4", "--out", "x.json"]
    args, _ = parse_args(base + ["--probe_layers", "2", "--steps", "1"])
    assert args.probe_layers == 2
    for bad in (["--probe_layers", "2", "--steps", "3"],  # a stopped backward ends the run
                ["--probe_layers", "5", "--steps", "1"]):  # more layers than the model has
        with pytest.raises(SystemExit):
            parse_args(base + bad)


# ---- the bench on CPU ranks ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def reference_forward_losses(warm_len: int, probe_len: int = 256):
    """The bench's model, data and optimizer (SGD, clipping at 1) in one float64 process: a whole step at
    ``warm_len`` tokens (none for 0), then the forward of a whole step at ``probe_len``. Their losses."""
    from examples.train import load_corpus, sample_batch

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    corpus, gen = load_corpus(8.0), torch.Generator().manual_seed(0)
    losses = []
    if warm_len:
        b = sample_batch(corpus, 1, warm_len, gen)
        loss = model(input_ids=b["input_ids"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    b = sample_batch(corpus, 1, probe_len, gen)
    losses.append(model(input_ids=b["input_ids"], labels=b["labels"]).loss.item())
    return losses


TINY = ["--seq_len", "256", "--hidden", "64", "--intermediate", "128", "--layers", "4", "--heads", "4",
        "--kv_heads", "2", "--tie_word_embeddings", "1", "--checkpointing", "--dtype", "float32",
        "--optimizer", "sgd", "--lr", "0.3", "--lr_warmup_steps", "0", "--steps", "1", "--probe_layers", "2"]


@pytest.mark.parametrize("mode,world,extra,warm_len", [
    # ds_longctx on two ranks (Ulysses): checkpoints and FPDT chunks offloaded, MLP tiles; the warm-up length
    # rounded up to the block's multiple (the FPDT chunk)
    ("ds_longctx", 2, ["--kernel", "auto", "--chunk_size", "64", "--offload", "--checkpoint_offload",
                       "--mlp_tile_tokens", "64", "--warm_seq_len", "100"], 128),
    # the flag's earlier spelling, in the commands of committed probes
    ("alst", 1, ["--alst_loss_tile_gib", "6e-5", "--probe_warm_seq_len", "100"], 100),
    ("deepspeed", 1, [], 0),  # the probe alone
])
def test_probe_run_stops_after_two_layers_backward_with_the_forward_of_a_full_step(tmp_path, mode, world, extra,
                                                                                   warm_len):
    d = launch(world, str(tmp_path / "p.json"), "--mode", mode, *TINY, *extra)  # exits 0

    *warm, probe = d["steps"]
    assert [r["seq_len"] for r in d["steps"]] == ([warm_len] if warm_len else []) + [256]
    assert all(r["warm_step"] and r["tokens_per_s"] > 0 for r in warm)  # a whole step, recorded as one
    p = probe["probe"]
    assert p["layers"] == p["stopped_after_layer_backward"] == 2
    assert [b["layer"] for b in p["layer_backwards"]] == [3, 2]
    assert [b["params_with_gradient"] for b in p["layer_backwards"]] == [9, 9] and p["params_per_layer"] == [9] * 4
    assert p["layers_with_gradients"] == [2, 3]  # the first layers' parameters got no gradient
    assert len(probe["layer_backward_peaks_gib"]) == 2 and "forward_peak_gib" in probe
    assert "tokens_per_s" not in probe and "tflops_per_gpu" not in probe
    assert d["optimizer_steps"] == len(warm)  # the warm-up's step only: none after the probe
    # the probe's forward is the whole step's: its loss is the float64 reference's (after the same warm-up)
    assert [r["loss"] for r in d["steps"]] == pytest.approx(reference_forward_losses(warm_len), rel=1e-5)
    s = d["summary"]
    assert d["probe_layers"] == 2 and s["probe_layers"] == 2 and s["probe_peak_gib"] == probe["peak_gib"]
    assert "tokens_per_s" not in s and "tflops_per_gpu" not in s and "partial" not in d


def test_a_training_run_after_a_warm_up_step_times_only_its_steps_at_the_length(tmp_path):
    assert TINY[-2:] == ["--probe_layers", "2"]
    train = TINY[:-2]  # the same run, trained instead of probed
    d = launch(1, str(tmp_path / "t.json"), "--mode", "deepspeed", *train, "--warmup", "0", "--warm_seq_len", "100")

    warm, step = d["steps"]
    assert (warm["seq_len"], warm["warm_step"], step["seq_len"]) == (100, True, 256) and "warm_step" not in step
    assert d["optimizer_steps"] == 2
    # the rates are the step's at the length alone; its peak is a steady one (the optimizer's state was there)
    s = d["summary"]
    assert s["tokens_per_s"] == step["tokens_per_s"] and s["tflops_per_gpu"] == step["tflops_per_gpu"]
    assert s["steady_peak_gib"] == step["peak_gib"]
    assert [r["loss"] for r in d["steps"]] == pytest.approx(reference_forward_losses(100), rel=1e-5)


# ---- the report and the sweep driver ------------------------------------------------------------------------

def _run(label, seq_len, **fields):
    d = {"mode": label, "label": label, "seq_len": seq_len, "model": "llama3.1-8b", "layers": 4, "hidden": 4096,
         "params": 1.0e9, "vocab": 128256, "world_size": 1, "steps": [{"loss": 5.5}], "date": "d", "command": "c",
         "commit": "x", "versions": {"torch": "t"}}
    d.update(fields)
    return d


def test_report_shows_probes_as_fitting_and_counts_them_apart_from_trained_lengths():
    from bench.report import long_sequence_tables

    probe = {"probe_peak_gib": 120.4, "probe_layers": 2, "probe_host_pinned_gib": 60.0,
             "probe_host_pinned_total_gib": 70.0, "peak_gib": 120.4}
    rows = [("a.json", _run("alst", 524288, summary={"tokens_per_s": 900.0, "tflops_per_gpu": 1.0,
                                                       "steady_peak_gib": 80.0})),
            ("b.json", _run("alst", 1048576, probe_layers=2, summary=probe)),
            ("c.json", _run("alst", 2097152, probe_layers=2,
                            oom={"step": 1, "kind": "gpu", "error": "CUDA out of memory", "peak_gib": 139.0,
                                 "phase": "backward of layer 3"}))]
    text = "\n".join(long_sequence_tables(rows))
    assert "| alst | 1048576 | fits (probe: 2 layers' backward) | | 120.4 | 60.0 | 70.0 | 5.500 | `b.json` |" in text
    assert "OOM (gpu, step 1, backward of layer 3, probe, 139.0 GiB)" in text
    assert "| run | longest trained | first out of memory | longest that fits (probe) |" in text
    assert "| alst | 524288 | 2097152 | 1048576 |" in text  # trained 512K; the probe's 1M only in its column
    # a warm-up step whose optimizer step peaked higher than the probe (a short probe): its peak is shown
    rows[1][1]["summary"] = dict(probe, peak_gib=130.0)
    assert "| fits (probe: 2 layers' backward) | | 130.0 |" in "\n".join(long_sequence_tables(rows))


def test_sweep_driver_runs_probes_and_predicts_from_the_probes_seconds(tmp_path, capsys):
    from bench.run_alst_compare import main, scaling_seconds

    main(["--model", "llama3.1-8b", "--layers", "4", "--lengths", "1048576", "--variants", "alst",
          "--probe-layers", "2", "--budget-s", "600", "--out-dir", str(tmp_path), "--dry-run"])
    cmd = capsys.readouterr().out.split("\n")[0]
    assert "--steps 1 --warmup 0" in cmd and "--probe_layers 2 --warm_seq_len 4096" in cmd
    summary = json.loads((tmp_path / "alstcmp_summary.json").read_text())
    assert summary["probe_layers"] == 2 and summary["steps"] == 1
    # the warm-up step (a fixed 4096 tokens) is time outside the steps; the probe's grows with the length
    assert scaling_seconds({"steps": [{"seconds": 5.0, "warm_step": True}, {"seconds": 40.0, "probe": {}}]}) == [40.0]
    # records written before the rename mark it "probe_warm"
    assert scaling_seconds({"steps": [{"seconds": 5.0, "probe_warm": True}, {"seconds": 40.0, "probe": {}}]}) == [40.0]


def test_sweep_driver_warms_training_runs_up_when_asked(tmp_path, capsys):
    from bench.run_alst_compare import main

    main(["--model", "llama3.2-3b", "--lengths", "524288", "--variants", "alst", "--steps", "1", "--warmup", "0",
          "--warm-seq-len", "4096", "--budget-s", "600", "--out-dir", str(tmp_path), "--dry-run"])
    cmd = capsys.readouterr().out.split("\n")[0]
    assert "--steps 1 --warmup 0" in cmd and "--warm_seq_len 4096" in cmd and "--probe_layers" not in cmd
