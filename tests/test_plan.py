"""The planner (``ds_longctx.plan``): component arithmetic, the search, "auto" values, the CLI's contract."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ds_longctx.cli import main
from ds_longctx.config import LongContextConfig
from ds_longctx.plan import GIB, Machine, MachineError, ModelSpec, Run, Settings, ZeroSettings, detect, rates_for
from ds_longctx.plan.estimate import estimate, estimate_host, estimate_memory
from ds_longctx.plan.machine import cgroup_available_bytes, meminfo_available_bytes
from ds_longctx.plan.offload_optimizer import parameter_numels, power_of_two_ceil
from ds_longctx.plan.preflight import PlanError, check, prepare, resolve
from ds_longctx.plan.search import UNCHECKED_MIN_GAIN, best, fits_at_all, longest
from ds_longctx.plan.verdict import Margins, judge
from ds_longctx.plan.rates import HOPPER

LLAMA_3B = {"num_hidden_layers": 28, "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 128}
SMALL = ModelSpec(layers=4, hidden=64, intermediate=256, heads=4, kv_heads=2, head_dim=16, vocab=256,
                  tied_embeddings=False)
H200 = Machine(gpus=1, gpu_memory=int(139.8 * GIB), host_memory=125 * GIB, gpu_name="NVIDIA H200")


def test_model_spec_counts_the_parameters_of_the_transformers_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    assert ModelSpec.from_config(config).params == sum(p.numel() for p in model.parameters())
    config.tie_word_embeddings = True
    tied = transformers.LlamaForCausalLM(config)
    assert ModelSpec.from_config(config).params == sum(p.numel() for p in tied.parameters())


def test_model_spec_reads_a_config_file_or_its_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3B))
    assert ModelSpec.from_path(tmp_path) == ModelSpec.from_path(tmp_path / "config.json")
    assert ModelSpec.from_path(tmp_path).layers == 28
    with pytest.raises(Exception, match="no such file"):
        ModelSpec.from_path(tmp_path / "missing.json")


def test_static_components_follow_zero3_partitions():
    run = Run(model=SMALL, world=4, seq_len=1024)
    on_gpu = estimate_memory(run, Settings(ulysses=2, ring=2))["forward"]
    n = SMALL.params
    assert on_gpu["gradients"] == 2 * n // 4
    assert on_gpu["optimizer_states"] == 12 * n // 4  # fp32 master, Adam's m and v
    offloaded = estimate_memory(run, Settings(ulysses=2, ring=2, zero=ZeroSettings(optimizer_offload=True)))
    assert offloaded["forward"]["optimizer_states"] == 0 and offloaded["forward"]["gradients"] == 0
    host = estimate_host(run, Settings(ulysses=2, ring=2, zero=ZeroSettings(optimizer_offload=True)))
    # pinned: the fp32 gradients and the bf16 gradient partitions, each rounded up to a power of two by torch's
    # pinned allocator; the fp32 master weights and Adam's moments are pageable (DeepSpeed 0.19.8's stage3.py)
    shard = sum(-(-p // 4) for p in parameter_numels(SMALL))
    assert host["optimizer_offload"] == power_of_two_ceil(4 * shard) + power_of_two_ceil(2 * shard)


def test_checkpoints_and_kept_outputs_move_to_the_host_layer_by_layer():
    tokens = 4096 // 2  # world 2, sp 2
    run = Run(model=SMALL, world=2, seq_len=4096)
    per_layer_input = tokens * SMALL.hidden * 2
    per_layer_kept = tokens * (SMALL.q_width * 2 + SMALL.heads * 4)
    for offloaded in range(SMALL.layers + 1):
        settings = Settings(ring=2, checkpoint_offload_layers=offloaded)
        gpu = estimate_memory(run, settings)["forward"]
        host = estimate_host(run, settings)
        on_gpu = SMALL.layers - offloaded
        assert gpu["checkpoints"] == on_gpu * per_layer_input
        assert gpu["kept_attention"] == on_gpu * per_layer_kept
        assert host["checkpoint_offload"] == offloaded * per_layer_input
        assert host["kept_attention"] == offloaded * per_layer_kept


def test_fpdt_offload_holds_one_layers_chunks_on_the_host_and_a_few_chunks_on_the_gpu():
    run = Run(model=SMALL, world=1, seq_len=8192)
    chunked = Settings(chunk_size=1024, fpdt_offload=True)
    host = estimate_host(run, chunked)
    w = SMALL
    assert host["fpdt_chunks"] == 8192 * (2 * (2 * w.q_width + 2 * w.kv_width) + 4 * w.heads + 8 * w.kv_width)
    # the attention's GPU state does not grow with the sequence, the unchunked one does
    def attention_state(seq_len, settings):
        return estimate_memory(run.with_seq_len(seq_len), settings)["layer_backward"]["layer_saved"]
    assert attention_state(16384, chunked) - attention_state(8192, chunked) < (
        attention_state(16384, Settings()) - attention_state(8192, Settings()))


def test_tiles_remove_the_intermediate_and_vocabulary_wide_activations():
    run = Run(model=SMALL, world=1, seq_len=65536)
    plain = estimate(run, Settings(), rates_for("NVIDIA H200"))
    tiled = estimate(run, Settings(mlp_tile_tokens=1024, loss_tile_tokens=1024), rates_for("NVIDIA H200"))
    assert tiled.gpu_peak < plain.gpu_peak
    assert tiled.moments["loss_backward"] < plain.moments["loss_backward"]
    assert tiled.step_seconds > plain.step_seconds  # tiles recompute the MLP and the LM head


def test_the_search_returns_the_fastest_configuration_that_fits_and_validates():
    model = ModelSpec.from_config(LLAMA_3B)
    run = Run(model=model, world=8, seq_len=524288)
    machine = Machine(gpus=8, gpu_memory=int(139.8 * GIB), host_memory=1000 * GIB, gpu_name="NVIDIA H200")
    winner, _ = best(run, machine, Margins.default(machine))
    assert winner is not None and winner.fits
    block = winner.settings.block(model.layers, run.seq_len)
    cfg = LongContextConfig.from_block(block)
    cfg.check_world(8)
    cfg.check_heads(model.heads, model.kv_heads)
    cfg.check_seq_len(run.seq_len)
    assert cfg.ulysses_degree * cfg.ring_degree == 8 and cfg.ulysses_degree <= 8


@pytest.mark.parametrize("gpu_gib,host_gib", [(None, None), (40.0, 96.0)])
def test_the_longest_sequence_fits_and_a_tenth_more_does_not_with_any_configuration(gpu_gib, host_gib):
    machine = H200 if gpu_gib is None else Machine(gpus=1, gpu_memory=int(gpu_gib * GIB),
                                                   host_memory=int(host_gib * GIB), gpu_name="NVIDIA H200")
    model = ModelSpec.from_config(LLAMA_3B)
    run = Run(model=model, world=1, seq_len=1)
    margins = Margins.default(machine)
    longest_fit = longest(run, machine, margins)
    assert longest_fit is not None and longest_fit.fits
    # the first length of the search's finest step at or past 1.1x: nothing fits there, whatever the settings
    longer = run.with_seq_len(-(-int(longest_fit.run.seq_len * 1.1) // 1024) * 1024)
    assert best(longer, machine, margins)[0] is None
    # the search's bisection asks only whether anything fits, stopping at the first that does: what best() says
    for tokens in (longest_fit.run.seq_len, longest_fit.run.seq_len + 1024, longer.seq_len):
        assert fits_at_all(run.with_seq_len(tokens), machine, margins) == (
            best(run.with_seq_len(tokens), machine, margins)[0] is not None)


def test_auto_values_resolve_to_the_searched_configuration():
    cfg = LongContextConfig.from_block({"fpdt": {"chunk_size": "auto", "offload": "auto"}, "mlp_tile_tokens": "auto",
                                        "loss_tile_tokens": "auto", "keep_attention_output": "auto",
                                        "checkpoint_offload": "auto", "checkpoint_layers": "auto",
                                        "checkpoint_every": "auto"})
    with pytest.raises(Exception, match="still \"auto\""):
        cfg.attention_kwargs()
    resolved = prepare(cfg, LLAMA_3B, {"zero_optimization": {"stage": 3}}, world=1, seq_len=262144, machine=H200)
    assert resolved.auto_fields == []
    winner, _ = best(Run(ModelSpec.from_config(LLAMA_3B), 1, 262144), H200, Margins.default(H200))
    assert resolved.model_dump(mode="json", exclude={"seq_len", "preflight", "causal", "load_balance"}) == \
        LongContextConfig.from_block(winner.settings.block(28)).model_dump(
            mode="json", exclude={"seq_len", "preflight", "causal", "load_balance"})
    # fixed fields stay as the user set them
    pinned = LongContextConfig.from_block({"fpdt": {"chunk_size": 32768, "offload": "auto"}, "loss_tile_tokens": 4096,
                                           "checkpoint_offload": "auto"})
    assert resolve(pinned, Run(ModelSpec.from_config(LLAMA_3B), 1, 262144), H200, Margins.default(H200),
                   ZeroSettings()).fpdt.chunk_size == 32768


def test_preflight_names_the_largest_components_and_a_configuration_that_fits():
    run = Run(ModelSpec.from_config(LLAMA_3B), 1, 262144)
    with pytest.raises(PlanError) as info:
        check(LongContextConfig.from_block({}), run, H200, Margins.default(H200), ZeroSettings())
    message = str(info.value)
    assert "loss_working_set" in message and "a configuration that fits" in message
    assert "preflight=false" in message


def test_machine_facts_come_from_flags_and_without_a_gpu_the_error_names_the_flag(tmp_path):
    machine = detect(gpus=64, gpu_memory_gib=139.8, host_memory_gib=2000)
    assert machine.gpus == 64 and machine.gpu_memory == int(139.8 * GIB)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(MachineError, match="--gpus"):
        detect(gpu_memory_gib=80, host_memory_gib=100)
    with pytest.raises(MachineError, match="--gpu-memory-gib"):
        detect(gpus=1, host_memory_gib=100)


def test_host_memory_comes_from_the_cgroup_limit_else_mem_available(tmp_path):
    (tmp_path / "memory.max").write_text("10737418240\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert cgroup_available_bytes(str(tmp_path)) == 9 * GIB
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_available_bytes(str(tmp_path)) is None
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:  10 kB\nMemAvailable:   2048 kB\n")
    assert meminfo_available_bytes(str(meminfo)) == 2048 * 1024


def _plan(capsys, tmp_path, *args):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3B))
    code = main(["plan", "--model", str(tmp_path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_is_one_object_with_the_contract_keys(capsys, tmp_path):
    code, out, _ = _plan(capsys, tmp_path, "--seq-len", "262144", "--gpus", "1", "--gpu-memory-gib", "139.8",
                         "--host-memory-gib", "125", "--json")
    record = json.loads(out)
    assert code == 0 and record["fits"] is True and record["seq_len"] == 262144
    for key in ("gpu_peak_gib", "host_pinned_gib", "step_seconds", "components", "ds_config"):
        assert key in record
    assert record["ds_config"]["zero_optimization"]["stage"] == 3
    LongContextConfig.from_ds_config(record["ds_config"]).check_seq_len(262144)
    assert abs(sum(record["components"].values()) - record["gpu_peak_gib"]) < 0.01


def test_plan_of_a_given_config_evaluates_it_and_exits_1_when_it_does_not_fit(capsys, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                              "long_context": {"ulysses_degree": 1}}))
    code, out, err = _plan(capsys, tmp_path, "--seq-len", "262144", "--gpus", "1", "--gpu-memory-gib", "139.8",
                           "--host-memory-gib", "125", "--ds-config", str(ds), "--json")
    record = json.loads(out)
    assert code == 1 and record["fits"] is False and "fastest that fits" in record["reason"]
    assert record["ds_config"]["long_context"]["ulysses_degree"] == 1


def test_plan_max_finds_the_longest_sequence(capsys, tmp_path):
    code, out, _ = _plan(capsys, tmp_path, "--seq-len", "max", "--gpus", "1", "--gpu-memory-gib", "139.8",
                         "--host-memory-gib", "125", "--json")
    record = json.loads(out)
    assert code == 0 and record["fits"] and record["seq_len"] > 262144
    assert record["ds_config"]["long_context"]["seq_len"] == record["seq_len"]


def test_plan_for_a_chosen_kernel_predicts_at_its_rate_and_writes_it_in_the_block(capsys, tmp_path):
    args = ("--seq-len", "131072", "--gpus", "1", "--gpu-memory-gib", "139.8", "--host-memory-gib", "125", "--json")
    plans = {}
    for kernel in ("flash_attn4", "sdpa_cudnn"):
        code, out, _ = _plan(capsys, tmp_path, *args, "--kernel", kernel)
        assert code == 0
        plans[kernel] = json.loads(out)
        assert plans[kernel]["ds_config"]["long_context"]["kernel"] == kernel
    ratio = plans["sdpa_cudnn"]["time_components"]["attention"] / plans["flash_attn4"]["time_components"]["attention"]
    assert ratio == pytest.approx(HOPPER.attention_flops["flash_attn4"] / HOPPER.attention_flops["sdpa_cudnn"], rel=0.01)


def test_plan_errors_name_what_is_missing(capsys, tmp_path):
    if not torch.cuda.is_available():
        code, _, err = _plan(capsys, tmp_path, "--seq-len", "262144")
        assert code == 2 and "--gpus" in err
    code, _, err = _plan(capsys, tmp_path, "--seq-len", "lots", "--gpus", "1", "--gpu-memory-gib", "80",
                         "--host-memory-gib", "100")
    assert code == 2 and "--seq-len" in err
    code, out, err = _plan(capsys, tmp_path, "--seq-len", "262144", "--gpus", "1", "--gpu-memory-gib", "8",
                           "--host-memory-gib", "16")
    assert code == 1 and "nothing fits" in out + err


def test_validate_with_a_model_runs_the_preflight_check(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3B))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"long_context": {"ulysses_degree": 1}}))
    code = main(["validate", str(ds), "--model", str(tmp_path), "--seq-len", "262144", "--gpus", "1",
                 "--gpu-memory-gib", "139.8", "--host-memory-gib", "125"])
    _, err = capsys.readouterr()
    assert code == 1 and "pre-flight" in err
    ds.write_text(json.dumps({"long_context": {"fpdt": {"chunk_size": 65536, "offload": True},
                                               "checkpoint_offload": True, "loss_tile_tokens": 4096}}))
    assert main(["validate", str(ds), "--model", str(tmp_path), "--seq-len", "262144", "--gpus", "1",
                 "--gpu-memory-gib", "139.8", "--host-memory-gib", "125"]) == 0


def test_each_unchecked_layer_keeps_its_whole_activations_and_the_checkpointed_ones_their_checkpoints():
    """SMALL at 1024 tokens, one rank, lean norms, no tiles or chunks: a layer without checkpointing keeps, per
    token, its two norms' outputs and 1/rms (2 x (128 + 4)), the residual sum (128), q/k/v after RoPE
    (2 x (64 + 32 + 32)), the attention output and fp32 log-sum-exps (128 + 4 x 4), the MLP's four
    intermediate-wide activations (4 x 2 x 256) and its input (128): 2968 bytes; the checkpointed layer its input
    (128) and kept attention output (144)."""
    tokens = 1024
    run = Run(model=SMALL, world=1, seq_len=tokens)
    forward = estimate_memory(run, Settings(checkpoint_layers=1))["forward"]
    assert forward["activations"] == 3 * tokens * 2968
    assert forward["checkpoints"] == 1 * tokens * 128
    assert forward["kept_attention"] == 1 * tokens * 144
    # the same per layer as every layer's without checkpointing
    unchecked = estimate_memory(Run(model=SMALL, world=1, seq_len=tokens, checkpointing=False), Settings())
    assert unchecked["forward"]["activations"] == 4 * tokens * 2968
    assert "activations" not in estimate_memory(run, Settings())["forward"]


def test_the_fused_gating_keeps_one_intermediate_wide_activation_less_per_layer_and_the_block_says_so():
    tokens = 1024
    run = Run(model=SMALL, world=1, seq_len=tokens)
    one_less = tokens * 2 * SMALL.intermediate  # act(gate), bf16
    eager = estimate_memory(run, Settings(checkpoint_layers=1))
    fused = estimate_memory(run, Settings(checkpoint_layers=1, fused_gated_mlp=True))
    assert eager["forward"]["activations"] - fused["forward"]["activations"] == 3 * one_less
    assert eager["checkpointed_backward"]["layer_saved"] - fused["checkpointed_backward"]["layer_saved"] == one_less
    settings = Settings(fused_norms=True, fused_gated_mlp=True, fused_rope=True)
    block = settings.block(SMALL.layers)
    assert (block["fused_norms"], block["fused_gated_mlp"], block["fused_rope"]) == (True, True, True)
    assert Settings.from_block(block, SMALL.layers, ZeroSettings()) == settings


def test_within_alsts_memory_at_131k_the_plan_is_one_attention_call_with_the_fused_kernels():
    """Llama-3.2-3B at 131K tokens on a GPU of 0.68 x ALST's measured peak (bench/run_alst_compare.py's lean
    plan): the fused gating's smaller layer makes one unchunked attention call fit, which ran 2% faster than
    64K FPDT chunks on an H200 (bench/results/alstcmp_ds_longctx_lean*_fusedall_llama3.2-3b_131072.json)."""
    model = ModelSpec.from_config({**LLAMA_3B, "max_position_embeddings": 131072})
    machine = Machine(gpus=1, gpu_memory=int(0.68 * 64.43 * GIB), host_memory=int(124.23 * GIB),
                      gpu_name="NVIDIA H200")
    margins = Margins(gpu=0, host=int(0.10 * machine.host_memory))
    run = Run(model=model, world=1, seq_len=131072)
    winner, _ = best(run, machine, margins, None, Settings.recommended("sdpa_cudnn"))
    chosen = winner.settings
    assert (chosen.chunk_size, chosen.fused_gated_mlp, chosen.host_optimizer_states) == (None, True, True)
    # without the fused gating the unchunked layer does not fit: FPDT's chunks were the choice
    eager, _ = best(run, machine, margins, None, Settings(kernel="sdpa_cudnn"))
    assert eager.settings.chunk_size == 65536 and eager.settings.fpdt_offload


def test_the_last_layer_backward_recomputes_only_when_it_is_checkpointed():
    run = Run(model=SMALL, world=1, seq_len=1024)
    every = estimate_memory(run, Settings())
    assert "layer_saved" in every["layer_backward"] and "checkpointed_backward" not in every
    partly = estimate_memory(run, Settings(checkpoint_layers=2))
    assert "layer_saved" not in partly["layer_backward"] and "layer_working_set" in partly["layer_backward"]
    # the last checkpointed layer recomputes after the unchecked ones freed their activations
    assert partly["checkpointed_backward"]["activations"] == 0
    assert partly["checkpointed_backward"]["layer_saved"] == every["layer_backward"]["layer_saved"]
    assert "checkpointed_backward" not in estimate_memory(run, Settings(checkpoint_layers=0))


def test_unchecked_layers_skip_the_recompute_of_their_matmuls_and_keep_their_fpdt_chunks_on_the_host():
    run = Run(model=SMALL, world=1, seq_len=4096)
    rates = rates_for("NVIDIA H200")
    every = estimate(run, Settings(), rates)
    partly = estimate(run, Settings(checkpoint_layers=1), rates)
    recompute = 2 * 3 * (SMALL.layer_params - 2 * SMALL.hidden) * 4096  # three layers' forward matmuls
    assert every.time_components["matmul"] - partly.time_components["matmul"] == pytest.approx(
        recompute / rates.matmul_flops, rel=1e-12)
    assert partly.step_seconds < every.step_seconds
    fpdt = Settings(chunk_size=1024, fpdt_offload=True)
    one_set = estimate_host(run, fpdt)["fpdt_chunks"]
    assert estimate_host(run, fpdt.with_(checkpoint_layers=1))["fpdt_chunks"] == 3 * one_set
    # kept outputs wait on the host for the checkpointed layer only
    assert estimate_host(run, fpdt.with_(checkpoint_layers=1))["kept_attention"] == \
        estimate_host(run, fpdt)["kept_attention"] // 4


def test_the_search_leaves_the_most_last_layers_unchecked_that_fit_when_it_is_faster():
    run = Run(ModelSpec.from_config(LLAMA_3B), 1, 65536)
    margins = Margins.default(H200)
    winner, _ = best(run, H200, margins)
    every, _ = best(run, H200, margins, {"checkpoint_layers": None})
    checkpointed = winner.settings.checkpoint_layers
    assert checkpointed is not None and 0 < checkpointed < 28
    assert winner.estimate.step_seconds < every.estimate.step_seconds * (1 - UNCHECKED_MIN_GAIN)
    # one more unchecked layer (its checkpoints offloaded as the winner's) would not fit the GPU
    more = winner.settings.with_(checkpoint_layers=checkpointed - 1,
                                 checkpoint_offload_layers=min(checkpointed - 1,
                                                               winner.settings.checkpoint_offload_layers))
    assert not judge(run, more, H200, margins).fits_gpu
    block = LongContextConfig.from_block(winner.settings.block(28))
    assert block.checkpoint_layers == checkpointed
    assert block.checkpoint_offload is True or block.checkpoint_offload <= checkpointed


def test_layers_stay_checkpointed_where_leaving_some_unchecked_saves_too_little_time():
    run = Run(ModelSpec.from_config(LLAMA_3B), 1, 262144)
    margins = Margins.default(H200)
    winner, _ = best(run, H200, margins)
    unchecked, _ = best(run, H200, margins, {"checkpoint_layers": 26})
    assert unchecked.fits and unchecked.estimate.step_seconds < winner.estimate.step_seconds
    assert unchecked.estimate.step_seconds > winner.estimate.step_seconds * (1 - UNCHECKED_MIN_GAIN)
    assert winner.settings.checkpoint_layers is None


def test_checkpoint_layers_auto_resolves_and_a_pinned_offload_stays_within_it():
    model = ModelSpec.from_config(LLAMA_3B)
    cfg = LongContextConfig.from_block({"checkpoint_layers": "auto", "checkpoint_offload": 24,
                                        "fpdt": {"chunk_size": 65536, "offload": True}, "loss_tile_tokens": 4096})
    resolved = prepare(cfg, LLAMA_3B, {"zero_optimization": {"stage": 3}}, world=1, seq_len=131072, machine=H200)
    assert resolved.auto_fields == [] and resolved.checkpoint_offload == 24
    # every layer checkpointed (unchecked ones would save under UNCHECKED_MIN_GAIN here), and no candidate the
    # search weighs leaves an offloaded layer unchecked
    assert resolved.checkpoint_layers is None
    from ds_longctx.plan.preflight import fixed_fields
    from ds_longctx.plan.search import candidates
    run = Run(model, 1, 131072)
    fixed = fixed_fields(cfg, model.layers, ZeroSettings())
    counts = {s.checkpointed(model.layers) for s in candidates(run, H200, Margins.default(H200), fixed)}
    assert min(counts) == 24 and max(counts) == model.layers
    with pytest.raises(Exception, match="checkpoint_layers: 29 exceeds the model's 28 decoder layers"):
        prepare(LongContextConfig.from_block({"checkpoint_layers": 29}), LLAMA_3B, {}, world=1, seq_len=131072,
                machine=H200)


def test_plan_prints_the_chosen_checkpoint_layers_in_its_block(capsys, tmp_path):
    flags = ("--seq-len", "65536", "--gpus", "1", "--gpu-memory-gib", "139.8", "--host-memory-gib", "125")
    code, out, _ = _plan(capsys, tmp_path, *flags, "--json")
    block = json.loads(out)["ds_config"]["long_context"]
    assert code == 0 and 0 < block["checkpoint_layers"] < 28
    assert LongContextConfig.from_block(block).checkpoint_layers == block["checkpoint_layers"]
    code, out, _ = _plan(capsys, tmp_path, *flags)
    assert f"checkpoint_layers       {block['checkpoint_layers']}" in out


def test_checkpoint_every_keeps_one_input_per_group_and_reruns_the_layers_before_the_others():
    """``checkpoint_every`` N: only the first layer of each group of N keeps its input (on the GPU or, offloaded, on
    the host); the last layer's backward holds its rebuilt input; the step runs (N - 1) / 2 more layer forwards
    per layer (the layer at offset j reruns j)."""
    run = Run(model=SMALL, world=1, seq_len=4096)  # 4 layers
    rates = rates_for("NVIDIA H200")
    per_layer_input = 4096 * SMALL.hidden * 2
    every_layer = estimate(run, Settings(keep_attention_output=False), rates)
    for every, kept, reruns in ((2, 2, 2), (3, 2, 3), (4, 1, 6)):
        settings = Settings(keep_attention_output=False, checkpoint_every=every)
        moments = estimate_memory(run, settings)
        assert moments["forward"]["checkpoints"] == kept * per_layer_input
        # the last layer (offset 3 % every) rebuilds its input unless it starts a group
        rebuilt = moments["layer_backward"].get("rebuilt_input", 0)
        assert rebuilt == (per_layer_input if 3 % every else 0)
        offloaded = estimate_host(run, settings.with_(checkpoint_offload_layers=4))
        assert offloaded["checkpoint_offload"] == kept * per_layer_input
        forward_matmuls = 2 * (SMALL.layer_params - 2 * SMALL.hidden) * 4096
        got = estimate(run, settings, rates)
        assert got.time_components["matmul"] - every_layer.time_components["matmul"] == pytest.approx(
            reruns * forward_matmuls / rates.matmul_flops, rel=1e-12)
        assert got.step_seconds > every_layer.step_seconds


def test_partly_offloaded_groups_keep_the_inputs_of_their_group_starts_on_the_gpu_and_the_host_layer_by_layer():
    """The planner's counts of kept inputs and reruns are those of the layers one by one: layer ``l`` keeps its
    input when ``l % every == 0``, the first ``checkpoint_offload_layers`` in host memory, the rest on the GPU;
    the layer at offset ``l % every`` reruns as many forwards."""
    from ds_longctx.plan.activations import inputs_kept, keeps_input, reruns

    run = Run(model=SMALL, world=1, seq_len=4096)  # 4 layers
    per_layer_input = 4096 * SMALL.hidden * 2
    for every in (1, 2, 3, 4, 5):
        settings = Settings(keep_attention_output=False, checkpoint_every=every)
        for first in range(9):
            for end in range(first, 12):
                one_by_one = sum(keeps_input(layer, settings) for layer in range(first, end))
                assert inputs_kept(first, end, settings) == one_by_one
        for layers in range(1, 4 + 1):
            one_by_one = sum(layer % every for layer in range(layers))
            assert reruns(run, settings.with_(checkpoint_layers=layers)).layers == one_by_one
        for offloaded in range(5):
            placed = settings.with_(checkpoint_offload_layers=offloaded)
            on_gpu = sum(keeps_input(layer, placed) for layer in range(offloaded, 4))
            on_host = sum(keeps_input(layer, placed) for layer in range(offloaded))
            assert estimate_memory(run, placed)["forward"]["checkpoints"] == on_gpu * per_layer_input
            assert estimate_host(run, placed).get("checkpoint_offload", 0) == on_host * per_layer_input


def test_the_search_rebuilds_inputs_only_where_keeping_every_input_does_not_fit():
    """Full-depth Llama-3.2-3B on one H200: where every layer keeping its input and its attention output fits,
    the plan keeps them (rebuilding is never faster); the longest sequence rebuilds inputs and is longer than the
    longest with every input kept."""
    machine, model = H200, ModelSpec.from_config(LLAMA_3B)
    margins = Margins.default(machine)
    verdict, _ = best(Run(model=model, world=1, seq_len=262144), machine, margins)
    assert verdict.settings.checkpoint_every == 1
    run = Run(model=model, world=1, seq_len=1)
    longest_fit = longest(run, machine, margins, granule=131072, fine=32768)
    kept_every = longest(run, machine, margins, fixed={"checkpoint_every": 1}, granule=131072, fine=32768)
    assert longest_fit.settings.checkpoint_every > 1
    assert longest_fit.run.seq_len >= 1.5 * kept_every.run.seq_len
    assert longest_fit.settings.block(model.layers)["checkpoint_every"] == longest_fit.settings.checkpoint_every


def test_a_rerun_that_takes_the_kept_attention_output_costs_no_attention():
    """Rebuilding inputs reruns the layers before (``(N - 1) / 2`` per layer for ``checkpoint_every`` N): with kept
    attention outputs only their projections and MLP, with the attention recomputed their attention too."""
    from ds_longctx.plan.rates import rates_for
    from ds_longctx.plan.step_time import estimate_time

    model, rates = ModelSpec.from_config(LLAMA_3B), rates_for("NVIDIA H200")
    run = Run(model=model, world=1, seq_len=131072)
    parts = {(keep, every): estimate_time(run, Settings(kernel="sdpa_cudnn", keep_attention_output=keep,
                                                        checkpoint_every=every), rates, "NVIDIA H200")
             for keep in (True, False) for every in (1, 3)}
    assert parts[True, 3]["attention"] == parts[True, 1]["attention"]
    assert parts[True, 3]["matmul"] > parts[True, 1]["matmul"]
    reruns = 9 * (1 + 2)  # 9 groups of 3 layers and the last alone: offsets 1 and 2 rerun 1 and 2 layers
    per_layer_forward = 2.0 * 131072 ** 2 * model.q_width / rates.attention_flops["sdpa_cudnn"]
    assert parts[False, 3]["attention"] - parts[False, 1]["attention"] == pytest.approx(reruns * per_layer_forward)


def test_where_only_recomputed_attention_keeps_every_input_rebuilt_inputs_with_kept_outputs_win():
    """Full-depth Llama-3.2-3B at 524,288 tokens on one H200: with every input kept, only plans that recompute
    the attention fit; rebuilding inputs frees the memory for the attention outputs, and since a rerun then
    costs no attention that plan is faster, and chosen."""
    machine, model = H200, ModelSpec.from_config(LLAMA_3B)
    margins = Margins.default(machine)
    run = Run(model=model, world=1, seq_len=524288)
    kept_inputs, _ = best(run, machine, margins, fixed={"checkpoint_every": 1})
    assert not kept_inputs.settings.keep_attention_output
    chosen, _ = best(run, machine, margins)
    assert chosen.settings.checkpoint_every > 1 and chosen.settings.keep_attention_output and chosen.fits
    assert chosen.estimate.step_seconds < 0.9 * kept_inputs.estimate.step_seconds
    # a block that recomputes the attention keeps every input
    recomputing, _ = best(run, machine, margins, fixed={"keep_attention_output": False})
    assert recomputing.settings.checkpoint_every == 1


def test_the_unchunked_attention_backward_holds_fp32_dq_dk_dv_and_an_unchecked_last_layer_its_gradients():
    """The unchunked attention's backward: d(out), bf16 dq/dk/dv, the kernel's fp32 dq and dK/dV accumulators and
    the residual gradient, less what the MLP freed (an 8-layer slice at 1.57M tokens on an H200 peaked 137.0 GiB
    where this was 12 GiB short); an unchecked last layer's backward holds them too (beside its MLP's)."""
    from ds_longctx.plan.activations import Widths
    from ds_longctx.plan.estimate import _layer_backward

    run = Run(model=SMALL, world=1, seq_len=4096)
    settings = Settings(mlp_tile_tokens=128, keep_attention_output=False)  # small tiles: the attention's phase peaks
    w, tokens = Widths(SMALL, settings), 4096
    working = _layer_backward(run, settings, w, tokens, recompute=True)
    phase = tokens * (2 * (2 * w.q + 2 * w.kv) + 4 * (w.q + 2 * w.kv) + 2 * 2 * w.h)
    assert working["attention_working_set"] == phase - working["mlp_working_set"] - tokens * 2 * w.h
    unchecked = estimate_memory(run, settings.with_(checkpoint_layers=3))["layer_backward"]
    alone = _layer_backward(run, settings, w, tokens, recompute=False)
    assert unchecked["layer_working_set"] == alone["mlp_working_set"] + alone["attention_working_set"] > \
        alone["mlp_working_set"]


def test_keeping_the_outputs_reruns_take_holds_them_for_all_but_each_groups_last_layer():
    """``keep_attention_output: "reruns"`` with ``checkpoint_every`` N: layer by layer, the kept outputs are those of
    every layer but the last of each group and the last checkpointed one (on the GPU, or in host memory for the
    offloaded first layers); only the layers without one run their attention again, in their own backward, and
    no rerun runs an attention."""
    from ds_longctx.checkpoint_pattern import attention_outputs_kept, keeps_attention_output
    from ds_longctx.plan.activations import Widths, kept_bytes, reruns

    assert [keeps_attention_output("reruns", layer, 3, 7) for layer in range(7)] == [
        True, True, False, True, True, False, False]
    assert [keeps_attention_output("reruns", layer, 1, 4) for layer in range(4)] == [False] * 4
    for keep in (True, False, "reruns"):  # the count is the rule's, layer by layer
        for every in range(1, 6):
            for checkpointed in range(9):
                for first in range(10):
                    for end in range(first, 11):
                        one_by_one = sum(keeps_attention_output(keep, layer, every, checkpointed)
                                         for layer in range(first, min(end, checkpointed)))
                        assert attention_outputs_kept(keep, first, min(end, checkpointed), every,
                                                      checkpointed) == one_by_one
    run = Run(model=SMALL, world=1, seq_len=4096)  # 4 layers
    rates = rates_for("NVIDIA H200")
    one_output = kept_bytes(4096, Widths(SMALL, Settings()))
    attention_forward = 2.0 * 4096 ** 2 * SMALL.q_width / rates.attention_flops["sdpa_cudnn"]
    for every, kept in ((2, [0, 2]), (3, [0, 1]), (4, [0, 1, 2])):
        settings = Settings(kernel="sdpa_cudnn", keep_attention_output="reruns", checkpoint_every=every)
        for offloaded in range(5):
            placed = settings.with_(checkpoint_offload_layers=offloaded)
            on_host = sum(layer < offloaded for layer in kept)
            assert estimate_memory(run, placed)["forward"]["kept_attention"] == (len(kept) - on_host) * one_output
            assert estimate_host(run, placed).get("kept_attention", 0) == on_host * one_output
        # every layer a rerun runs keeps its output: reruns run no attention, as with every output kept
        layers_rerun = [layer for i in range(4) for layer in range(i - i % every, i)]
        assert all(layer in kept for layer in layers_rerun)
        assert reruns(run, settings) == (len(layers_rerun), 0)
        assert reruns(run, settings.with_(keep_attention_output=False)) == (len(layers_rerun), len(layers_rerun))
        every_kept = estimate(run, settings.with_(keep_attention_output=True), rates).time_components["attention"]
        assert estimate(run, settings, rates).time_components["attention"] == pytest.approx(
            every_kept + (4 - len(kept)) * attention_forward, rel=1e-12)


def test_within_alsts_memory_at_524k_the_plan_keeps_the_outputs_reruns_take():
    """Full-depth Llama-3.2-3B at 524,288 tokens on a GPU of 0.68 x ALST's measured peak (108.9 GiB,
    bench/results/alstcmp524k_alst_llama3.2-3b_524288.json) and the H200 machine's host: the attention outputs of
    every layer do not fit beside the inputs and AdamW's moments, so the plan rebuilt inputs that take kept outputs
    everywhere but in each group's last layer; its predicted step is at least 1.3x faster than ALST's measured
    516.7 s, where every input kept recomputes every attention (only 1.19x)."""
    model = ModelSpec.from_config({**LLAMA_3B, "max_position_embeddings": 524288})
    machine = Machine(gpus=1, gpu_memory=int(0.68 * 108.91 * GIB), host_memory=int(124.53 * GIB),
                      gpu_name="NVIDIA H200")
    margins = Margins(gpu=0, host=int(0.10 * machine.host_memory))
    run = Run(model=model, world=1, seq_len=524288)
    kept_inputs, _ = best(run, machine, margins, {"checkpoint_every": 1}, Settings.recommended("sdpa_cudnn"))
    assert kept_inputs.settings.keep_attention_output is False and kept_inputs.estimate.step_seconds > 516.7 / 1.3
    every_output, _ = best(run, machine, margins, {"keep_attention_output": True}, Settings.recommended("sdpa_cudnn"))
    chosen, _ = best(run, machine, margins, None, Settings.recommended("sdpa_cudnn"))
    assert chosen.settings.keep_attention_output == "reruns" and chosen.settings.checkpoint_every > 1
    assert chosen.fits and chosen.estimate.step_seconds < 516.7 / 1.3
    assert every_output is None or every_output.estimate.step_seconds > chosen.estimate.step_seconds
