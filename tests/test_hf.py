"""transformers models on the ds_longctx attention, in one process (no sequence parallelism).

The distributed cases (shards on 4 ranks, training) are in test_deepspeed_integration.py.
"""
from __future__ import annotations

import pytest
import torch

from ds_longctx.config import LongContextConfig, LongContextConfigError
from ds_longctx.integration.context import LongContext, long_context_of
from ds_longctx.integration.hf import ATTN_IMPLEMENTATION, HFModelError, apply, hf_attention
from ds_longctx.topology import Topology
from tests import deepspeed_cases as cases


def setup(kind="llama", block=None, seq_len=32):
    model = cases.build_model(kind, seq_len)
    lc = LongContext(Topology(), LongContextConfig.from_block(block or {"kernel": "reference"}))
    apply(model, lc)
    return model, lc


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_switched_model_gives_the_logits_of_its_own_attention(kind):
    model, _ = setup(kind)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    reference = cases.build_model(kind, 32)
    reference.set_attn_implementation("sdpa")
    ids = cases.full_batch(0, 0, 2, 32)["input_ids"]
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_packed_documents_give_the_logits_of_transformers_own_packing():
    """``cu_seq_lens_q`` (what shard_batch adds for restarting position ids) keeps each token in its document,
    as transformers' sdpa does for such position ids; without it the attention runs across documents."""
    from ds_longctx.integration.data import packed_boundaries

    model, _ = setup()
    reference = cases.build_model("llama", 32)
    reference.set_attn_implementation("sdpa")
    batch = cases.full_batch(0, 0, 1, 32, packed=True)
    ids, pos = batch["input_ids"], batch["position_ids"]
    cu = torch.tensor(packed_boundaries(pos), dtype=torch.int32)
    assert len(cu) > 2
    with torch.no_grad():
        want = reference(input_ids=ids, position_ids=pos, use_cache=False).logits
        got = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits
        across = model(input_ids=ids, position_ids=pos).logits
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(got, want) < 1e-5
    assert rel(across, want) > 1e-3
    with pytest.raises(HFModelError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 32]))


def test_a_batch_from_transformers_flattening_collator_trains_on_its_documents():
    """DataCollatorWithFlattening's batch (restarting position ids, cu_seq_lens, max lengths, labels -100 at
    each document's start) through shard_batch and ``model(**batch)``: the logits and loss of transformers'
    own model on the same batch."""
    from transformers import DataCollatorWithFlattening

    model, lc = setup()
    reference = cases.build_model("llama", 32)
    reference.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(1)
    features = [{"input_ids": torch.randint(0, cases.VOCAB, (n,), generator=g).tolist()} for n in (5, 11, 7, 9)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    assert batch["input_ids"].shape == (1, 32) and batch["cu_seq_lens_q"].tolist() == [0, 5, 16, 23, 32]
    local = lc.shard_batch(batch)
    assert local["cu_seq_lens_q"].tolist() == [0, 5, 16, 23, 32] and "max_length_q" not in local
    inputs = {key: local[key] for key in ("input_ids", "position_ids", "cu_seq_lens_q")}
    with torch.no_grad():
        got = model(**inputs).logits
        want = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        loss = lc.loss(got, local["shift_labels"])
        want_loss = torch.nn.functional.cross_entropy(want[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)


def test_every_submodule_reaches_the_run_and_copies_share_it():
    import copy

    model, lc = setup()
    assert all(long_context_of(m) is lc for m in model.modules())
    assert long_context_of(copy.deepcopy(model)) is lc
    assert "_ds_longctx" not in "".join(model.state_dict())


def test_kv_cache_is_off_unless_asked_for():
    model, _ = setup()
    ids = cases.full_batch(0, 0, 1, 32)["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).past_key_values is None


def test_attention_mask_is_refused_with_what_to_do():
    model, _ = setup()
    ids = cases.full_batch(0, 0, 1, 32)["input_ids"]
    with pytest.raises(HFModelError, match="drop it, or pass the batch through shard_batch"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_length_outside_the_layout_is_refused_before_the_attention():
    model, _ = setup(block={"fpdt": {"chunk_size": 8}, "kernel": "reference"})
    with pytest.raises(LongContextConfigError, match="global sequence length \\(local 30 x sp 1\\) 30"):
        model(input_ids=torch.zeros(1, 30, dtype=torch.long))


def test_attention_dropout_is_refused():
    model, _ = setup()
    model.config.attention_dropout = 0.1
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.1
    model.train()
    with pytest.raises(HFModelError, match="attention_dropout to 0"):
        model(input_ids=torch.zeros(1, 32, dtype=torch.long))


def test_attention_of_a_module_that_was_not_set_up_says_how():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(HFModelError, match="ds_longctx.initialize"):
        hf_attention(torch.nn.Linear(1, 1), q, q, q, None)


def test_ulysses_degree_beyond_the_heads_is_refused_at_apply():
    model = cases.build_model("llama", 32)  # 4 query heads
    lc = LongContext(Topology(), LongContextConfig.from_block({"ulysses_degree": 8}))
    with pytest.raises(LongContextConfigError, match="exceeds the model's 4 query heads"):
        apply(model, lc)


@pytest.mark.parametrize("tile", [None, 5, 64])
def test_shift_labels_in_the_call_return_the_loss_of_the_logits(tile):
    """``.loss`` equals the loss of the full logits; tiled, the model returns no logits and the same loss and
    gradients (float64)."""
    from ds_longctx.integration.loss import causal_lm_loss

    model, lc = setup(block={"kernel": "reference", "loss_tile_tokens": tile})
    model.double()
    reference, _ = setup()
    reference.double()
    batch = lc.shard_batch(cases.full_batch(0, 0, 2, 32))
    out = model(input_ids=batch["input_ids"], shift_labels=batch["shift_labels"])
    want = causal_lm_loss(reference(input_ids=batch["input_ids"]).logits, batch["shift_labels"], lc.topology)
    assert out.logits.shape[1] == (0 if tile else 32)
    assert abs(out.loss.item() - want.item()) < 1e-12 * abs(want.item())
    out.loss.backward()
    want.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert ((p.grad - q.grad).norm() / q.grad.norm()).item() < 1e-10, name


def _checkpointed_step_against_unchecked(block):
    """A 4-layer float64 Llama with gradient checkpointing on every layer and ``block``: asserts the loss and every
    gradient equal the same model's without checkpointing; returns the decoder layers whose MLP ran (each run,
    forward and backward) and the kernel forwards counted."""
    from tests.dist_cases import counted_kernel_forwards

    def build(extra):
        model = cases.build_model("llama", 32, layers=4).double()
        lc = LongContext(Topology(), LongContextConfig.from_block({"kernel": "reference", **extra}))
        apply(model, lc)
        return model, lc

    reference, lc = build({})
    model, _ = build(block)
    model.gradient_checkpointing_enable()  # every layer, as transformers sets it; the block narrows it
    model.train()
    mlp_calls = []
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: mlp_calls.append(i))
    batch = lc.shard_batch(cases.full_batch(0, 0, 2, 32))
    want = reference(input_ids=batch["input_ids"], shift_labels=batch["shift_labels"]).loss
    want.backward()
    with counted_kernel_forwards() as counted:
        got = model(input_ids=batch["input_ids"], shift_labels=batch["shift_labels"]).loss
        got.backward()
    assert abs(got.item() - want.item()) < 1e-12 * abs(want.item())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert ((p.grad - q.grad).norm() / q.grad.norm()).item() < 1e-10, name
    return sorted(mlp_calls), counted.forwards


@pytest.mark.parametrize("checkpointed", [0, 2, 4])
def test_only_the_first_checkpoint_layers_are_recomputed_with_the_gradients_of_no_checkpointing(checkpointed):
    """A 4-layer model with gradient checkpointing and ``checkpoint_layers`` N: the loss and every gradient of the
    model without checkpointing (float64); in backward only the first N layers run their MLP again, and no layer
    its attention (kept outputs)."""
    mlp_calls, forwards = _checkpointed_step_against_unchecked({"checkpoint_layers": checkpointed})
    assert mlp_calls == sorted([0, 1, 2, 3] + list(range(checkpointed)))
    assert forwards == 4


def test_checkpoint_layers_beyond_the_model_are_refused_naming_its_layers():
    model = cases.build_model("llama", 32, layers=4)
    lc = LongContext(Topology(), LongContextConfig.from_block({"checkpoint_layers": 5}))
    with pytest.raises(LongContextConfigError, match="checkpoint_layers: 5 exceeds the model's 4 decoder layers"):
        apply(model, lc)


@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("block", [
    {"keep_attention_output": True},
    {"keep_attention_output": False, "checkpoint_offload": True},
    {"keep_attention_output": False, "fpdt": {"chunk_size": 8, "offload": True}, "checkpoint_offload": 3},
    # the kept outputs in host memory (FPDT offload): a rerun copies one back and lets it go
    {"keep_attention_output": True, "fpdt": {"chunk_size": 8, "offload": True}, "checkpoint_offload": 3},
    # only the outputs reruns take (every layer's but the last of each group and the model's last), on the GPU
    # and, for the first three layers, in host memory
    {"keep_attention_output": "reruns"},
    {"keep_attention_output": "reruns", "checkpoint_offload": 3},
    {"keep_attention_output": "reruns", "fpdt": {"chunk_size": 8, "offload": True}, "checkpoint_offload": 3},
], ids=["kept_outputs", "offloaded_inputs", "fpdt_offload", "fpdt_offload_kept_outputs", "reruns_outputs",
        "reruns_outputs_offloaded", "fpdt_offload_reruns_outputs"])
def test_checkpoint_every_rebuilds_inputs_with_the_gradients_of_no_checkpointing(every, block):
    """A 4-layer model with gradient checkpointing and ``checkpoint_every`` N: the loss and every gradient of the
    model without checkpointing (float64); in backward the layers at offset j of each group of N run their layer
    before's forward j times more: its attention too, unless the layer keeps its attention output, which the
    rerun then takes (no attention kernel runs in it); a layer without a kept output runs its attention again
    in its own backward."""
    mlp_calls, forwards = _checkpointed_step_against_unchecked({**block, "checkpoint_every": every})
    reruns = [layer for i in range(4) for layer in range(i - i % every, i)]  # offset j reruns the j layers before it
    assert mlp_calls == sorted([0, 1, 2, 3] * 2 + reruns)
    keep = block["keep_attention_output"]
    # "reruns": groups (0, 1), (2, 3) keep layers 0 and 2; groups (0, 1, 2), (3,) keep layers 0 and 1
    keeping = {0, 1, 2, 3} if keep is True else {2: {0, 2}, 3: {0, 1}}[every] if keep == "reruns" else set()
    recomputed_attention = 4 - len(keeping)
    rerun_attention = sum(layer not in keeping for layer in reruns)
    chunks = 32 // block.get("fpdt", {}).get("chunk_size", 32)
    kernel_calls = chunks * (chunks + 1) // 2  # FPDT: one kernel per causal (query chunk, key chunk) pair
    assert forwards == (4 + recomputed_attention + rerun_attention) * kernel_calls
