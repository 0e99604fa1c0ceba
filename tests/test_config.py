"""The long_context block: validation errors that name the field, checks against the run, the templates."""
from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys

import pytest

from ds_longctx.config import (KERNEL_NAMES, LongContextConfig, LongContextConfigError, describe_fields,
                               from_ds_config, load_ds_config, resolved_block)
from ds_longctx.layout import ZigzagLayout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "ds_config_templates")


def error_of(block) -> str:
    with pytest.raises(LongContextConfigError) as info:
        LongContextConfig.from_block(block)
    return str(info.value)


def test_missing_block_means_no_sequence_parallelism():
    cfg = from_ds_config({"train_micro_batch_size_per_gpu": 1})
    assert (cfg.ulysses_degree, cfg.ring_degree, cfg.sp_degree) == (1, 1, 1)
    assert cfg.fpdt.chunk_size is None and cfg.fpdt.offload is False
    assert cfg.kernel == "auto" and cfg.causal is True and cfg.load_balance == "zigzag"


def test_full_block_resolves_to_its_values():
    block = {"ulysses_degree": 4, "ring_degree": 2, "fpdt": {"chunk_size": 4096, "offload": True},
             "kernel": "sdpa_cudnn", "causal": False, "keep_attention_output": False, "checkpoint_offload": True,
             "checkpoint_layers": 12, "checkpoint_every": 2,
             "mlp_tile_tokens": 4096, "loss_tile_tokens": 2048, "load_balance": "zigzag",
             "lean_rms_norm": False, "fused_norms": False, "fused_gated_mlp": False, "fused_rope": False, "host_optimizer_states": True,
             "seq_len": 1048576,
             "preflight": False,
             "timeout_s": 600.0}
    cfg = LongContextConfig.from_block(block)
    assert resolved_block(cfg) == block
    assert cfg.sp_degree == 8
    assert cfg.attention_kwargs() == {"kernel": "sdpa_cudnn", "chunk_size": 4096, "offload": True}


@pytest.mark.parametrize("block,path,hint", [
    ({"ulysses": 2}, "long_context.ulysses", "did you mean 'ulysses_degree'"),
    ({"ring_degre": 2}, "long_context.ring_degre", "did you mean 'ring_degree'"),
    ({"fpdt": {"chunksize": 8}}, "long_context.fpdt.chunksize", "did you mean 'chunk_size'"),
    ({"sequence_parallel_size": 2}, "long_context.sequence_parallel_size", "allowed keys here: ulysses_degree"),
])
def test_unknown_keys_are_rejected_naming_the_key_and_the_nearest_field(block, path, hint):
    msg = error_of(block)
    assert f"{path}: unknown key" in msg and hint in msg


@pytest.mark.parametrize("field", ["ulysses_degree", "ring_degree"])
@pytest.mark.parametrize("value", [0, -2, 1.5, 2.0, "2", True, None, [2]])
def test_degrees_must_be_positive_integers(field, value):
    msg = error_of({field: value})
    assert f"long_context.{field}:" in msg and f"(got {json.dumps(value)})" in msg


@pytest.mark.parametrize("value", [0, -1, 1.5, "8192", False])
def test_chunk_size_must_be_a_positive_integer_or_null(value):
    assert "long_context.fpdt.chunk_size:" in error_of({"fpdt": {"chunk_size": value}})


def test_chunk_size_null_is_no_chunking():
    assert LongContextConfig.from_block({"fpdt": {"chunk_size": None}}).fpdt.chunk_size is None


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_offload_must_be_a_boolean(value):
    assert "long_context.fpdt.offload:" in error_of({"fpdt": {"chunk_size": 64, "offload": value}})


def test_offload_without_chunking_says_to_set_chunk_size():
    msg = error_of({"fpdt": {"offload": True}})
    assert "long_context.fpdt.offload" in msg and "needs long_context.fpdt.chunk_size" in msg


def test_chunk_size_must_split_evenly_over_the_ulysses_ranks():
    msg = error_of({"ulysses_degree": 4, "fpdt": {"chunk_size": 6}})
    assert "long_context.fpdt.chunk_size: 6 is not a multiple of ulysses_degree 4" in msg and "e.g. 8" in msg


@pytest.mark.parametrize("ulysses,ring,chunk", [(4, 2, 16), (2, 2, 8), (1, 4, 6), (2, 1, 4)])
def test_fpdt_chunking_adds_whole_chunks_per_ring_position_to_the_length_check(ulysses, ring, chunk):
    cfg = LongContextConfig.from_block({"ulysses_degree": ulysses, "ring_degree": ring,
                                        "fpdt": {"chunk_size": chunk}})
    layout = ZigzagLayout(ring, ulysses, chunk)
    assert cfg.seq_multiple == math.lcm(layout.multiple, ring * chunk)
    for seq_len in range(cfg.seq_multiple, 4 * cfg.seq_multiple + 1):
        try:
            layout.check(seq_len)
            layout_ok = True
        except ValueError:
            layout_ok = False
        assert layout_ok == (seq_len % cfg.seq_multiple == 0), seq_len
    with pytest.raises(LongContextConfigError, match=f"fpdt.chunk_size={chunk}: whole chunks"):
        cfg.check_seq_len(cfg.seq_multiple + cfg.seq_multiple // 2)


def test_unknown_kernel_lists_the_kernels():
    msg = error_of({"kernel": "flash"})
    assert "long_context.kernel:" in msg and all(k in msg for k in KERNEL_NAMES)


def test_accepted_kernels_are_exactly_the_attention_kernels():
    from ds_longctx.kernels import kernel_names

    assert sorted(KERNEL_NAMES) == sorted(kernel_names())


@pytest.mark.parametrize("block", [{"load_balance": "contiguous"}, {"causal": "true"}, [1, 2], "ulysses"])
def test_other_bad_values_are_rejected(block):
    error_of(block)


def test_every_error_of_a_block_is_reported_at_once():
    msg = error_of({"ulysses_degree": 0, "ring_degree": "x", "kernal": "auto"})
    assert "long_context.ulysses_degree" in msg and "long_context.ring_degree" in msg and "long_context.kernal" in msg


def test_every_field_has_a_default_and_a_description():
    fields = list(describe_fields())
    names = {name for name, _, _ in fields}
    assert {"ulysses_degree", "ring_degree", "fpdt.chunk_size", "fpdt.offload", "kernel", "causal",
            "load_balance"} <= names
    assert all(len(desc) > 20 for _, _, desc in fields)
    LongContextConfig()  # every field has a default


@pytest.mark.parametrize("world,ulysses,ring,ok", [(8, 4, 2, True), (16, 4, 2, True), (12, 4, 2, False),
                                                   (4, 1, 3, False), (1, 1, 1, True)])
def test_world_size_must_be_a_multiple_of_the_sequence_parallel_degree(world, ulysses, ring, ok):
    cfg = LongContextConfig.from_block({"ulysses_degree": ulysses, "ring_degree": ring})
    if ok:
        cfg.check_world(world)
    else:
        with pytest.raises(LongContextConfigError, match=rf"does not divide the world size {world}; choose"):
            cfg.check_world(world)


def test_ulysses_beyond_the_query_heads_says_to_use_the_ring():
    cfg = LongContextConfig.from_block({"ulysses_degree": 8})
    cfg.check_heads(8, 1)  # MQA: kv heads are replicated, only query heads bound the degree
    with pytest.raises(LongContextConfigError, match="at most 4 and raise ring_degree"):
        cfg.check_heads(4, 4)
    with pytest.raises(LongContextConfigError, match="not a multiple of num_key_value_heads 3"):
        cfg.check_heads(8, 3)


@pytest.mark.parametrize("ulysses,ring", [(1, 1), (4, 1), (1, 4), (2, 2), (4, 2), (8, 3), (3, 4)])
def test_sequence_length_check_follows_the_layout(ulysses, ring):
    cfg = LongContextConfig.from_block({"ulysses_degree": ulysses, "ring_degree": ring})
    multiple = ZigzagLayout(ring, ulysses).multiple
    assert cfg.seq_multiple == multiple
    cfg.check_seq_len(7 * multiple)
    if multiple > 1:
        with pytest.raises(LongContextConfigError, match=rf"e\.g\. {8 * multiple}\)"):
            cfg.check_seq_len(7 * multiple + 1)


def test_head_counts_are_read_from_a_transformers_model():
    from ds_longctx.config import model_head_counts

    class Cfg:
        num_attention_heads = 32
        num_key_value_heads = 8

    class Model:
        config = Cfg()

    assert model_head_counts(Model()) == (32, 8)
    assert model_head_counts(object()) is None


def test_deepspeeds_own_sequence_parallel_keys_conflict_with_the_block():
    cfg = LongContextConfig.from_block({"ring_degree": 2})
    with pytest.raises(LongContextConfigError, match="remove sequence_parallel_size"):
        cfg.check_ds_config({"sequence_parallel_size": 2})
    LongContextConfig().check_ds_config({"sequence_parallel_size": 2})  # no sequence parallelism of ours


def test_config_is_read_from_json_hjson_and_base64(tmp_path):
    block = {"ulysses_degree": 2, "ring_degree": 2}
    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "long_context": block}))
    hj = tmp_path / "ds.hjson"
    hj.write_text("{\n  # comment\n  long_context: {ulysses_degree: 2, ring_degree: 2}\n}\n")
    b64 = base64.urlsafe_b64encode(js.read_bytes()).decode()
    for source in (str(js), js, str(hj), b64):
        assert from_ds_config(source).sp_degree == 4


@pytest.mark.parametrize("content,expect", [("{not json", "not valid JSON"),
                                            ('{"a": 1, "a": 2}', "duplicate keys ['a']"),
                                            ("[1, 2]", "must be a JSON object")])
def test_unreadable_files_name_the_file(tmp_path, content, expect):
    path = tmp_path / "ds_config.json"
    path.write_text(content)
    with pytest.raises(LongContextConfigError) as info:
        load_ds_config(str(path))
    assert str(path) in str(info.value) and expect in str(info.value)


def test_missing_file_is_reported():
    with pytest.raises(LongContextConfigError, match="does not exist"):
        load_ds_config("/nonexistent/ds_config.json")


def test_importing_the_package_does_not_import_deepspeed_or_transformers():
    code = ("import sys, ds_longctx, ds_longctx.config; "
            "print(sorted(m for m in ('deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ---- templates ------------------------------------------------------------------------------------------------

# template -> (world size of its README example, (ulysses, ring), what it must show)
TEMPLATE_TABLE = {
    "ulysses.json": (8, (8, 1), "bf16"),
    "ring.json": (8, (1, 8), "bf16"),
    "hybrid.json": (16, (4, 2), "bf16"),
    "hybrid_fpdt_offload.json": (16, (4, 2), "fpdt_offload"),
    "zero3_optimizer_offload.json": (8, (8, 1), "optimizer_offload"),
    "cpu_smoke.json": (2, (1, 2), "cpu"),
    "trainer_cpu_smoke.json": (2, (1, 2), "trainer"),
}


def test_the_template_directory_holds_exactly_the_documented_templates():
    assert sorted(f for f in os.listdir(TEMPLATES) if f.endswith(".json")) == sorted(TEMPLATE_TABLE)


@pytest.mark.parametrize("name", sorted(TEMPLATE_TABLE))
def test_template_loads_and_validates(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    path = os.path.join(TEMPLATES, name)
    world, (ulysses, ring), kind = TEMPLATE_TABLE[name]
    ds = load_ds_config(path)
    cfg = from_ds_config(path)
    assert (cfg.ulysses_degree, cfg.ring_degree) == (ulysses, ring)
    cfg.check_world(world)
    cfg.check_ds_config(ds)
    if kind == "trainer":  # transformers' Trainer fills these "auto" values from its arguments before DeepSpeed
        assert {k for k, v in ds.items() if v == "auto"} == {"train_micro_batch_size_per_gpu", "train_batch_size",
                                                             "gradient_accumulation_steps", "gradient_clipping"}
        ds = {**ds, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1,  # DeepSpeed sees one process here
              "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
        path = {k: v for k, v in ds.items() if k != "long_context"}
    ds_cfg = DeepSpeedConfig(path)  # DeepSpeed's own validation of the rest of the file
    assert ds_cfg.zero_optimization_stage == 3
    if kind in ("cpu", "trainer"):
        assert not ds_cfg.bfloat16_config.enabled and not ds_cfg.float16_config.enabled
        if kind == "cpu":
            assert ds["optimizer"]["params"].get("torch_adam") is True  # no C++ optimizer build on CPU
    else:
        assert ds_cfg.bfloat16_config.enabled
    if kind == "fpdt_offload":
        assert cfg.fpdt.offload and cfg.fpdt.chunk_size
    if kind == "optimizer_offload":
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # a multiple of the layout is a valid sequence length for the template
    cfg.check_seq_len(math.lcm(cfg.seq_multiple, 1024))


@pytest.mark.parametrize("value", [-1, 1.5, "all", True])
def test_checkpoint_layers_must_be_a_layer_count_auto_or_null(value):
    assert "long_context.checkpoint_layers" in error_of({"checkpoint_layers": value})


def test_checkpoint_offload_beyond_the_checkpointed_layers_is_refused_naming_both():
    msg = error_of({"checkpoint_layers": 4, "checkpoint_offload": 6})
    assert "long_context.checkpoint_offload: 6" in msg and "long_context.checkpoint_layers 4" in msg
    for offload in (4, True, False, "auto"):  # true: every checkpointed layer
        LongContextConfig.from_block({"checkpoint_layers": 4, "checkpoint_offload": offload})
    LongContextConfig.from_block({"checkpoint_layers": "auto", "checkpoint_offload": 6})


def test_checkpoint_layers_beyond_the_models_layers_name_its_layer_count():
    cfg = LongContextConfig.from_block({"checkpoint_layers": 33})
    cfg.check_layers(33)
    with pytest.raises(LongContextConfigError, match="checkpoint_layers: 33 exceeds the model's 32 decoder layers"):
        cfg.check_layers(32)


@pytest.mark.parametrize("value", [True, False, "auto", "reruns"])
def test_keep_attention_output_takes_true_false_auto_or_reruns(value):
    block = {"keep_attention_output": value, "checkpoint_every": 2}
    assert LongContextConfig.from_block(block).keep_attention_output == value


@pytest.mark.parametrize("every", [1, None])
def test_reruns_without_rebuilt_inputs_is_refused_saying_what_to_set(every):
    block = {"keep_attention_output": "reruns", **({"checkpoint_every": every} if every else {})}
    message = error_of(block)
    assert "keep_attention_output" in message and "set checkpoint_every to 2 or more" in message
    assert LongContextConfig.from_block({**block, "checkpoint_every": "auto"}).keep_attention_output == "reruns"


@pytest.mark.parametrize("value", ["rerun", 1, "true"])
def test_other_keep_attention_output_values_are_refused_naming_the_field(value):
    assert "keep_attention_output" in error_of({"keep_attention_output": value})
