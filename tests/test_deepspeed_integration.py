"""ds_longctx.initialize with ZeRO-3 on 4 gloo ranks trains transformers models exactly like one process.

Every case runs on one pool of 4 worker processes started once for this module (each launch costs the
torch/transformers/deepspeed imports), one case after the other.
"""
from __future__ import annotations

import pytest
import torch

from tests import deepspeed_cases as cases
from tests.distpool import DistPool
from tests.threads import persistent_threads

WORLD = 4
STEPS = 4
SEQ = 48
BATCH = 2
RTOL = 1e-5  # fp32: relative to each tensor's norm

# (ulysses, ring): every factorization of 4 (dp = 1) and dp = 2 x sp = 2 (both sp layouts across models)
TOPOLOGIES = {
    "llama": [(1, 4), (2, 2), (4, 1), (1, 2)],
    "qwen2": [(1, 4), (2, 2), (4, 1), (2, 1)],
    "qwen3": [(1, 4), (2, 2), (4, 1), (1, 2)],
    "mistral": [(1, 4), (2, 2), (4, 1), (2, 1)],
}
CASES = [(kind, u, r) for kind, tops in TOPOLOGIES.items() for u, r in tops]


@pytest.fixture(scope="module")
def pool():
    p = DistPool(WORLD)
    yield p
    p.close()


_references = {}


def reference(kind: str, dp: int, clip: float = 0.0, optim: str = "sgd", packed: bool = False) -> dict:
    key = (kind, dp, clip, optim, packed)
    if key not in _references:
        _references[key] = cases.train_single_process(kind, dp, STEPS, SEQ, BATCH, clip=clip, optim=optim,
                                                      packed=packed)
    return _references[key]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_run(results, ref, kind, ulysses, ring, compare_params=True, zero3=True, accum=1):
    dp = WORLD // (ulysses * ring)
    for res in results:
        info = res["info"]
        assert (info["sp"], info["dp"]) == (ulysses * ring, dp)
        assert info["attn_impl"] == (None if kind == "plain" else "ds_longctx")
        # ZeRO-3 partitions every parameter over all ranks and reduces gradients over all of them
        assert info["params_partitioned_over_world"] == zero3
        assert info["seq_dp_world"] == WORLD
        # DeepSpeed is told of no sequence parallelism, so every ZeRO path averages over all ranks
        assert info["sp_size_seen_by_ds"] == 1
        assert info["groups_released"]  # engine.destroy() gave back the groups ds_longctx built
        # micro-batch m of replica d is the reference's replica d * accum + m
        expected = [step[info["dp_rank"] * accum + m] for step in ref["losses"] for m in range(accum)]
        assert res["losses"] == pytest.approx(expected, rel=RTOL), f"rank {info['rank']}"
    if not compare_params:
        return
    final = results[0]["params"]
    initial = cases.build_model(kind, SEQ).state_dict()
    assert set(final) == set(ref["params"])
    for name, want in ref["params"].items():
        # the comparison means something only if training moved the weights far beyond the tolerance
        assert rel(initial[name], want) > 100 * RTOL, name
        assert rel(final[name], want) < RTOL, f"{name}: rel error {rel(final[name], want):.2e}"


@pytest.mark.parametrize("kind,ulysses,ring", CASES, ids=[f"{k}-U{u}xR{r}" for k, u, r in CASES])
def test_zero3_sequence_parallel_training_matches_single_process(pool, kind, ulysses, ring):
    results = pool.run(cases.train_with_deepspeed, kind, ulysses, ring, STEPS, SEQ, BATCH, timeout=300)
    check_run(results, reference(kind, WORLD // (ulysses * ring)), kind, ulysses, ring)


def test_engines_built_one_after_another_leave_no_threads_behind(pool):
    # Every process group keeps backend threads and connections until destroyed; engine.destroy() must
    # release the Topology's and the mpu's, or each engine a process builds slows all later collectives.
    # The first engine may start workers that stay for good (torch's and DeepSpeed's one-time pools, 7 -> 8 or 9
    # threads here): a leak shows as growth from the second engine on.
    counts_per_engine = []
    for _ in range(4):
        pool.run(cases.train_with_deepspeed, "llama", 2, 2, 1, SEQ, BATCH, timeout=300)
        counts_per_engine.append(pool.run(persistent_threads, timeout=60))  # every rank's, after destroy()
    for rank in range(WORLD):
        counts = [per_rank[rank] for per_rank in counts_per_engine]
        assert counts[2:] == [counts[1]] * 2, counts


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (1, 2)])
def test_plain_torch_module_calling_the_attention_trains_like_one_process(pool, ulysses, ring):
    results = pool.run(cases.train_with_deepspeed, "plain", ulysses, ring, STEPS, SEQ, BATCH, timeout=300)
    check_run(results, reference("plain", WORLD // (ulysses * ring)), "plain", ulysses, ring)


@pytest.mark.parametrize("ulysses,ring,chunk_size,offload", [(2, 2, 8, False), (2, 2, 12, True), (1, 2, 8, True)])
def test_fpdt_chunked_attention_trains_like_one_process(pool, ulysses, ring, chunk_size, offload):
    fpdt = {"chunk_size": chunk_size, "offload": offload}
    results = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, STEPS, SEQ, BATCH, fpdt=fpdt, timeout=300)
    check_run(results, reference("llama", WORLD // (ulysses * ring)), "llama", ulysses, ring)


# (ulysses, ring, fpdt chunk_size with offload or None, checkpointing, mlp_tile_tokens, checkpoint_offload)
CHECKPOINTED = [(2, 2, None, "keep", None, False), (1, 4, None, "recompute", 5, True), (4, 1, 12, "keep", 5, False),
                (1, 2, 8, "recompute", None, False), (2, 2, 8, "keep", 7, True), (2, 1, None, "keep", None, True)]


@pytest.mark.parametrize("ulysses,ring,chunk_size,checkpointing,tile,offload", CHECKPOINTED,
                         ids=[f"U{u}xR{r}-C{c}-{m}-tile{t}" + ("-offloaded" if o else "")
                              for u, r, c, m, t, o in CHECKPOINTED])
def test_checkpointed_layers_train_like_one_process_without_rerunning_attention(pool, ulysses, ring, chunk_size,
                                                                                checkpointing, tile, offload):
    """transformers' gradient checkpointing (enabled before or after initialize), with FPDT offload or not,
    with tiled MLPs or not, with the checkpoints in host memory or not: the same training; with kept attention
    outputs the attention kernels run forward once per step."""
    fpdt = {"chunk_size": chunk_size, "offload": True} if chunk_size else None
    results = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, STEPS, SEQ, BATCH, fpdt=fpdt,
                       checkpointing=checkpointing, mlp_tile_tokens=tile, checkpoint_offload=offload, timeout=300)
    check_run(results, reference("llama", WORLD // (ulysses * ring)), "llama", ulysses, ring)
    plain = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, 1, SEQ, BATCH, fpdt=fpdt, timeout=300)
    once = plain[0]["forwards"][0]
    assert once > 0
    # after a checkpointed forward the host holds each layer's input and, kept, its attention output
    # (fp32 [BATCH, SEQ / sp, hidden], the attention's output as wide as hidden); FPDT's chunks wait for the recompute
    layer_bytes = BATCH * SEQ // (ulysses * ring) * cases.HIDDEN * 4 * cases.LAYERS
    kept_on_host = checkpointing == "keep" and (offload or chunk_size is not None)
    held = (layer_bytes if offload else 0) + (layer_bytes if kept_on_host else 0)
    for res in results:
        assert res["forwards"] == [once if checkpointing == "keep" else 2 * once] * STEPS
        assert res["leased_after_forward"] == [held] * STEPS


# (ulysses, ring, fpdt chunk_size with offload or None, checkpointing, mlp_tile_tokens, checkpoint_offload);
# checkpoint_layers 1 of the model's 2: the first layer checkpointed, the second not
# (FPDT, MLP tiles and kept outputs with checkpoint_layers: test_checkpoint_layers_give_the_float64_loss_...)
PARTLY_CHECKPOINTED = [(2, 1, None, "recompute", None, True)]


@pytest.mark.parametrize("ulysses,ring,chunk_size,checkpointing,tile,offload", PARTLY_CHECKPOINTED,
                         ids=[f"U{u}xR{r}-C{c}-{m}-tile{t}-offload{o}" for u, r, c, m, t, o in PARTLY_CHECKPOINTED])
def test_layers_left_unchecked_train_like_one_process_without_being_recomputed(pool, ulysses, ring, chunk_size,
                                                                                checkpointing, tile, offload):
    """``checkpoint_layers: 1``: the second layer runs without checkpointing (FPDT offload, MLP tiles, lean norms
    in plain autograd there), the first with kept attention outputs or not and its checkpoint in host memory:
    the same training; only the checkpointed layer runs its attention again (without kept outputs), and only
    its input waits in host memory."""
    fpdt = {"chunk_size": chunk_size, "offload": True} if chunk_size else None
    results = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, STEPS, SEQ, BATCH, fpdt=fpdt,
                       checkpointing=checkpointing, mlp_tile_tokens=tile, checkpoint_offload=offload,
                       checkpoint_layers=1, timeout=300)
    check_run(results, reference("llama", WORLD // (ulysses * ring)), "llama", ulysses, ring)
    plain = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, 1, SEQ, BATCH, fpdt=fpdt, timeout=300)
    once = plain[0]["forwards"][0]
    assert once > 0 and once % cases.LAYERS == 0
    rerun = 0 if checkpointing == "keep" else once // cases.LAYERS  # one layer of two
    layer_input = BATCH * SEQ // (ulysses * ring) * cases.HIDDEN * 4  # fp32 [BATCH, SEQ / sp, hidden]
    for res in results:
        assert res["forwards"] == [once + rerun] * STEPS
        if chunk_size is None:
            assert res["leased_after_forward"] == [layer_input] * STEPS


# (ulysses, ring, fpdt chunk_size with offload or None, checkpointing, checkpoint_offload)
REBUILT_INPUTS = [(2, 1, 8, "recompute", True), (1, 2, None, "reruns", False)]


@pytest.mark.parametrize("ulysses,ring,chunk_size,checkpointing,offload", REBUILT_INPUTS,
                         ids=[f"U{u}xR{r}-C{c}-{m}" + ("-offloaded" if o else "") for u, r, c, m, o in REBUILT_INPUTS])
def test_layers_rebuilding_their_inputs_train_like_one_process(pool, ulysses, ring, chunk_size, checkpointing,
                                                               offload):
    """``checkpoint_every: 2`` under ZeRO-3: the second layer's input is not kept but rebuilt in backward by the
    first layer's forward once more (its parameters gathered again; its kept attention output taken, else its
    attention run again): the same training. Keeping the outputs reruns take (``"reruns"``: the first layer's),
    only the second layer runs its attention again, in its own backward; keeping none, every layer does and the
    first once more in the rerun, and only its input waits in host memory."""
    fpdt = {"chunk_size": chunk_size, "offload": True} if chunk_size else None
    results = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, STEPS, SEQ, BATCH, fpdt=fpdt,
                       checkpointing=checkpointing, checkpoint_offload=offload, checkpoint_every=2, timeout=300)
    check_run(results, reference("llama", WORLD // (ulysses * ring)), "llama", ulysses, ring)
    plain = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, 1, SEQ, BATCH, fpdt=fpdt, timeout=300)
    once = plain[0]["forwards"][0]
    assert once > 0 and once % cases.LAYERS == 0
    per_layer = once // cases.LAYERS
    recomputed = per_layer if checkpointing == "reruns" else once  # the group's last layer, or every layer
    rerun = 0 if checkpointing == "reruns" else per_layer
    layer_input = BATCH * SEQ // (ulysses * ring) * cases.HIDDEN * 4  # fp32 [BATCH, SEQ / sp, hidden]
    for res in results:
        assert res["forwards"] == [once + recomputed + rerun] * STEPS
        if offload and chunk_size is None:
            assert res["leased_after_forward"] == [layer_input] * STEPS


# (kind, ulysses, ring, FPDT chunk_size with offload or None, checkpointing)
PACKED = [("qwen3", 1, 4, None, None), ("mistral", 4, 1, None, None), ("llama", 1, 2, None, "keep"),
          ("llama", 2, 2, 8, "keep")]


@pytest.mark.parametrize("kind,ulysses,ring,chunk_size,checkpointing", PACKED,
                         ids=[f"{k}-U{u}xR{r}-C{c}-{m}" for k, u, r, c, m in PACKED])
def test_packed_documents_train_like_one_process_that_masks_them(pool, kind, ulysses, ring, chunk_size,
                                                                  checkpointing):
    """Batches of packed documents (position ids restarting per document): shard_batch hands the model the
    documents' boundaries and the distributed attention keeps tokens inside their documents, as transformers
    does on one device; through the ring, Ulysses, FPDT offload and kept attention outputs alike."""
    fpdt = {"chunk_size": chunk_size, "offload": True} if chunk_size else None
    results = pool.run(cases.train_with_deepspeed, kind, ulysses, ring, STEPS, SEQ, BATCH, fpdt=fpdt,
                       checkpointing=checkpointing, packed=True, timeout=300)
    check_run(results, reference(kind, WORLD // (ulysses * ring), packed=True), kind, ulysses, ring)


@pytest.mark.parametrize("ulysses,ring,tile", [(2, 2, None), (1, 4, 5), (2, 1, 7)])
def test_loss_returned_by_the_model_trains_like_one_process(pool, ulysses, ring, tile):
    """``engine(..., shift_labels=...)`` returns the group loss in ``.loss``; with ``loss_tile_tokens`` the
    model returns no logits and the loss runs the LM head tile by tile."""
    results = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, STEPS, SEQ, BATCH, loss_in_model=True,
                       loss_tile_tokens=tile, timeout=300)
    check_run(results, reference("llama", WORLD // (ulysses * ring)), "llama", ulysses, ring)
    for res in results:
        assert res["info"]["logits_kept"] == (0 if tile else SEQ // (ulysses * ring))


@pytest.mark.parametrize("ulysses,ring", [(1, 4), (1, 2)])
def test_gradient_clipping_uses_the_global_norm_over_all_partitions(pool, ulysses, ring):
    # With clipping active a wrong norm (e.g. summed over sequence ranks) changes every update.
    clip = 0.5
    ref = reference("llama", WORLD // (ulysses * ring), clip=clip)
    assert any(ref["clipped"]), "the clip threshold must bind for this test to mean anything"
    results = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, STEPS, SEQ, BATCH, clip=clip, timeout=300)
    check_run(results, ref, "llama", ulysses, ring)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_other_zero_stages_train_like_one_process(pool, stage):
    # Stages 0-2 reduce gradients on their own code paths (and stage 0 clips through the mpu's model-parallel
    # group); the mpu must give all of them the same averaging over all ranks.
    ref = reference("llama", 2, clip=0.5)
    assert any(ref["clipped"])
    results = pool.run(cases.train_with_deepspeed, "llama", 1, 2, STEPS, SEQ, BATCH, clip=0.5, zero_stage=stage,
                       timeout=300)
    check_run(results, ref, "llama", 1, 2, zero3=False)


def test_zero3_adamw_training_gives_the_single_process_losses(pool):
    # AdamW's per-element normalization amplifies fp32 rounding of near-zero gradient elements beyond a 1e-5
    # parameter tolerance (the gradients themselves agree to ~4e-7), so this case compares losses only.
    results = pool.run(cases.train_with_deepspeed, "llama", 2, 2, STEPS, SEQ, BATCH, optim="adamw", timeout=300)
    check_run(results, reference("llama", 1, optim="adamw"), "llama", 2, 2, compare_params=False)


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (1, 2)])
def test_gradient_accumulation_averages_micro_batches_like_one_process(pool, ulysses, ring):
    # 2 micro-batches per step on each replica: one process averaging dp x 2 batches per step is the reference
    dp, accum = WORLD // (ulysses * ring), 2
    ref = reference("llama", dp * accum)
    results = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, STEPS, SEQ, BATCH, grad_accum=accum,
                       timeout=300)
    check_run(results, ref, "llama", ulysses, ring, accum=accum)


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 4)])
def test_deepspeeds_dataloader_gives_a_sequence_group_the_same_samples_and_replicas_disjoint_ones(
        pool, ulysses, ring):
    # training_data= goes to DeepSpeed, whose sampler splits samples over the mpu's data-parallel replicas
    # only: the ranks of one sequence-parallel group must hold the same sequences for sharding to mean anything
    samples, batch = 16, 2
    dp = WORLD // (ulysses * ring)
    results = pool.run(cases.dataloader_batches, ulysses, ring, samples, SEQ, batch, timeout=300)

    by_replica = {}
    for res in results:
        assert len(res["indices"]) == samples // (dp * batch) and all(len(b) == batch for b in res["indices"])
        by_replica.setdefault(res["info"]["dp_rank"], []).append(res)
    assert len(by_replica) == dp
    seen = []
    for replica in by_replica.values():
        assert all(r["indices"] == replica[0]["indices"] for r in replica)  # the group's ranks alike
        assert all(r["losses"] == replica[0]["losses"] for r in replica)  # one loss for the whole sequence
        seen += [i for b in replica[0]["indices"] for i in b]
    assert sorted(seen) == list(range(samples))  # replicas disjoint, the epoch covered once


RESUME_CASES = [((2, 2), None), ((1, 2), None), ((2, 2), (4, 1))]


@pytest.mark.parametrize("topology,resume_as", RESUME_CASES,
                         ids=[f"U{t[0]}xR{t[1]}" + (f"-as-U{a[0]}xR{a[1]}" if a else "") for t, a in RESUME_CASES])
def test_a_saved_checkpoint_resumes_training_where_it_stopped(pool, tmp_path, topology, resume_as):
    # engine.save_checkpoint / load_checkpoint as in any DeepSpeed script: ZeRO-3 partitions, AdamW states and
    # the LR warmup come back, so the resumed run repeats the uninterrupted one. The partitions span all
    # ranks whatever the factorization, so a checkpoint also resumes under another U x R of the same world.
    results = pool.run(cases.save_and_resume, "llama", *topology, str(tmp_path), 3, 3, resume_as, timeout=300)

    for res in results:
        assert res["restored_steps"] == (3, 2)  # 3 optimizer steps done; the scheduler's last step index
        assert res["loaded_from"] is not None
        if resume_as is None:  # the same computation in the same order: the same bits
            assert res["resumed"] == res["uninterrupted"]
        else:  # attention summed in another order: fp32 rounding apart
            assert res["resumed"] == pytest.approx(res["uninterrupted"], rel=RTOL)
    # the losses move from step to step: equal runs are not equal by being constant
    assert len(set(results[0]["uninterrupted"])) == 3
    saved, before, loaded, full = (results[0][k] for k in ("saved", "before_load", "loaded", "consolidated"))
    # the fresh model starts elsewhere (other random weights; norms at their initial ones): loading did the work
    flat = lambda d: torch.cat([t.flatten() for t in d.values()])  # noqa: E731
    assert rel(flat(before), flat(saved)) > 0.1
    for name, want in saved.items():
        assert not torch.equal(before[name], want), name
        assert torch.equal(loaded[name], want), name
        assert torch.equal(full[name], want), name  # zero_to_fp32 gives the model a plain state dict


ERROR_CASES = {
    "blocks_differ": "ranks disagree",
    "unreadable_on_one_rank": "does not exist",
    "invalid_on_one_rank": "long_context.fpdt.chunk_size",
    "degrees_do_not_divide_world": "does not divide the world size 4",
    "more_ulysses_ranks_than_heads": "long_context.ulysses_degree: 4 exceeds the model's 2 query heads",
    "own_mpu": "drop the mpu argument",
    "deepspeed_sequence_parallel_key": "remove sequence_parallel_size",
    "config_given_twice": "both in args.deepspeed_config and as config=",
    "preflight_does_not_fit": "pre-flight: this step would not fit: GPU peak",
    "auto_without_seq_len_or_gpu": "mlp_tile_tokens are \"auto\", which needs a GPU",
    "checkpoint_layers_beyond_the_model": f"long_context.checkpoint_layers: {cases.LAYERS + 1} exceeds the model's "
                                          f"{cases.LAYERS} decoder layers",
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_user_errors_at_initialize_raise_on_every_rank_without_hanging(pool, case):
    raised = pool.run(cases.initialize_error, case, timeout=120)
    assert all(r.startswith("LongContextConfigError") for r in raised), raised
    assert all(ERROR_CASES[case] in r for r in raised), raised
    if case not in ("unreadable_on_one_rank", "invalid_on_one_rank"):
        assert len(set(raised)) == 1, raised  # word for word, except where the failing rank has its own detail


@pytest.mark.parametrize("case,expect", [("length", "sequence length 30 is not divisible by 4"),
                                         ("padding_mask", "attention_mask has padding zeros"),
                                         ("labels_shape", "labels must be a [1, 32] tensor"),
                                         ("rows_packed_differently", "packed with different document boundaries"),
                                         ("boundaries_disagree", "disagrees with the documents"),
                                         ("boundaries_range", "cu_seq_lens_q: cu_seqlens must run from 0 to the global sequence length 32")])
def test_a_bad_batch_on_one_replica_raises_on_every_rank(pool, case, expect):
    raised = pool.run(cases.batch_error, case, 1, 2, timeout=120)
    assert all(r.startswith("BatchError") and expect in r for r in raised), raised


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (1, 2)])
def test_sharded_labels_and_loss_give_the_unsharded_loss_and_gradient(pool, ulysses, ring):
    results = pool.run(cases.sharded_batch_and_loss, ulysses, ring, timeout=120)
    sp = ulysses * ring
    dp = WORLD // sp
    assert all(r["labels_ok"] and r["ids_ok"] for r in results)
    assert all(r["local_len"] == 48 // sp and "attention_mask" not in r["keys"] and "labels" not in r["keys"]
               for r in results)
    # the ranks of a replica hold disjoint positions that cover the sequence
    for d in range(dp):
        held = sorted(p for r in results if r["dp_rank"] == d for p in r["positions"])
        assert held == list(range(48))

    weight = results[0]["weight"].requires_grad_(True)
    losses = []
    for d in range(dp):
        r = next(r for r in results if r["dp_rank"] == d)
        logits = torch.nn.functional.linear(r["features"], weight)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 r["labels"][:, 1:].reshape(-1), ignore_index=-100)
        losses.append(loss)
        for other in results:
            if other["dp_rank"] == d:
                assert other["loss"] == pytest.approx(loss.item(), rel=1e-12)
    (sum(losses) / dp).backward()
    for r in results:
        assert rel(r["grad"], weight.grad) < 1e-12


@pytest.mark.parametrize("kind,ulysses,ring", [("llama", 2, 2), ("qwen3", 1, 4), ("mistral", 4, 1)])
def test_hf_model_on_shards_without_position_ids_gives_the_full_models_logits(pool, kind, ulysses, ring):
    errors = pool.run(cases.hf_forward_matches_full, kind, ulysses, ring, timeout=120)
    assert max(errors) < 1e-12, errors


# (ulysses, ring, block): checkpoint_layers 2 of 4 with kept outputs, checkpoint offload of the first layer, MLP
# tiles running the fused gating and FPDT chunks in host memory; with the attention recomputed; and no layer
# checkpointed (tiled loss)
CHECKPOINT_LAYERS = [
    (1, 2, {"checkpoint_layers": 2, "checkpoint_offload": 1, "mlp_tile_tokens": 5, "fused_gated_mlp": True,
            "fpdt": {"chunk_size": 8, "offload": True}}),
    (2, 1, {"checkpoint_layers": 2, "keep_attention_output": False, "checkpoint_offload": True}),
    (2, 1, {"checkpoint_layers": 0, "mlp_tile_tokens": 7, "fpdt": {"chunk_size": 8, "offload": True},
            "loss_tile_tokens": 5}),
]


@pytest.mark.parametrize("ulysses,ring,block", CHECKPOINT_LAYERS, ids=["U1xR2-fpdt-fused-tiles-offload1",
                                                                      "U2xR1-recompute-offloaded", "U2xR1-none"])
def test_checkpoint_layers_give_the_float64_loss_and_gradients_of_no_checkpointing(pool, ulysses, ring, block):
    """A 4-layer Llama with every layer's gradient checkpointing on and ``checkpoint_layers`` N on 2 ranks: the
    loss and every parameter's gradient of the model without checkpointing on one process (float64; the
    distributed attention merges in fp32) and exactly those of the same ranks without checkpointing; only the
    first N layers run again in backward."""
    results = pool.run(cases.hf_checkpoint_layers_vs_float64, ulysses, ring, block, timeout=300)
    n = block["checkpoint_layers"]
    for res in results:
        assert max(res["reference"].values()) < RTOL, res["reference"]
        assert max(res["unchecked"].values()) < 1e-12, res["unchecked"]
        assert res["runs"] == [2] * n + [1] * (4 - n)


def test_model_labels_under_sequence_parallelism_are_refused_with_what_to_pass(pool):
    raised = pool.run(cases.model_labels_error, 1, 2, timeout=120)
    assert len(set(raised)) == 1 and raised[0].startswith("HFModelError") and "shift_labels=" in raised[0]


def test_sliding_window_shorter_than_the_sequence_is_refused_on_every_rank(pool):
    raised = pool.run(cases.sliding_window_error, 2, 2, timeout=120)
    assert len(set(raised)) == 1 and raised[0].startswith("HFModelError") and "sliding window of 16" in raised[0]


# "auto" values resolved at the first batch: the checkpointed tiny Llama, 1 x 2 (two replicas), every planner
# value "auto", on the smallest GPU the planner fits 48 tokens on (its leanest configuration: not the defaults).
AUTO_TOPOLOGY = (1, 2)


@pytest.fixture(scope="module")
def auto_gpu_kib():
    return cases.smallest_gpu_kib(*AUTO_TOPOLOGY, BATCH, SEQ)


def _without_seq_len(block: dict) -> dict:
    return {k: v for k, v in block.items() if k != "seq_len"}


@pytest.mark.parametrize("layers_auto", [False, True], ids=["every_layer_checkpointed", "checkpoint_layers_auto"])
def test_auto_values_resolve_at_the_first_batch_as_from_seq_len_and_train_alike(pool, auto_gpu_kib, layers_auto):
    auto = cases.LAYERS_AUTO if layers_auto else cases.ALL_AUTO
    # checkpoint_layers: a GPU twice the smallest, where leaving layers unchecked is worth it (on the smallest
    # the planner's gain is below UNCHECKED_MIN_GAIN and every layer stays checkpointed)
    gpu_kib = 2 * auto_gpu_kib if layers_auto else auto_gpu_kib
    at_batch = pool.run(cases.auto_from_first_batch, *AUTO_TOPOLOGY, gpu_kib, [[SEQ, SEQ]] * 3, auto=auto,
                        timeout=300)
    at_init = pool.run(cases.auto_from_first_batch, *AUTO_TOPOLOGY, gpu_kib, [[SEQ, SEQ]] * 3,
                       seq_len_in_block=SEQ, auto=auto, timeout=300)
    planned = cases.planned_block(*AUTO_TOPOLOGY, BATCH, SEQ, gpu_kib, auto=auto)
    if layers_auto:  # the planner leaves every layer unchecked: the layers change at the first batch
        assert planned["checkpoint_layers"] == 0
    else:
        defaults = cases.planned_block(*AUTO_TOPOLOGY, BATCH, SEQ, 1 << 22, auto=auto)
        assert planned != defaults  # the resolution has something to get right
    ref = reference("llama", WORLD // 2)
    for lazy, eager in zip(at_batch, at_init):
        assert lazy["error"] is None and eager["error"] is None, (lazy["error"], eager["error"])
        # initialize left every value "auto"; the first shard_batch resolved the same block as seq_len does
        assert lazy["after_initialize"]["keep_attention_output"] == "auto"
        assert eager["after_initialize"] == eager["block"]
        assert _without_seq_len(lazy["block"]) == _without_seq_len(eager["block"]) == _without_seq_len(planned)
        # the resolved values reached the layers before the first forward: the same kernel calls, the same losses
        assert lazy["forwards"] == eager["forwards"]
        assert lazy["losses"] == eager["losses"]
        expected = [step[lazy["dp_rank"]] for step in ref["losses"][:3]]
        assert lazy["losses"] == pytest.approx(expected, rel=RTOL)
    # logged once, on rank 0
    assert [r["logged"] for r in at_batch] == [1, 0, 0, 0] == [r["logged"] for r in at_init]


@pytest.mark.parametrize("case,lengths,expect", [
    ("ranks_disagree", [[SEQ, SEQ // 2]],
     "LongContextConfigError: the first batch: the ranks' sequence lengths differ (rank 0: 48, rank 1: 48, "
     "rank 2: 24, rank 3: 24)"),
    ("too_long", [[2 * SEQ, 2 * SEQ]], "LongContextConfigError: no configuration of model (2 layers) at 96 tokens"),
    ("longer_later_batch", [[SEQ // 4] * 2, [SEQ // 2] * 2, [SEQ // 4] * 2, [SEQ] * 2],
     "BatchError: a batch of sequence length 48, longer than any before: pre-flight: this step would not fit"),
])
def test_first_batch_auto_errors_raise_on_every_rank_alike(pool, auto_gpu_kib, case, lengths, expect):
    results = pool.run(cases.auto_from_first_batch, *AUTO_TOPOLOGY, auto_gpu_kib, lengths, timeout=300)
    errors = [r["error"] for r in results]
    assert len(set(errors)) == 1 and errors[0].startswith(expect), errors
    if case == "ranks_disagree":
        assert "set long_context.seq_len" in errors[0]
    if case == "longer_later_batch":
        # resolved for 12 tokens; 24 (longer, checked: it fits) and 12 again ran; 48 would not fit with that block
        assert all(len(r["losses"]) == 3 for r in results)
        assert _without_seq_len(results[0]["block"]) == _without_seq_len(
            cases.planned_block(*AUTO_TOPOLOGY, BATCH, SEQ // 4, auto_gpu_kib))
    else:
        assert all(r["losses"] == [] and r["block"]["keep_attention_output"] == "auto" for r in results)


def test_a_model_call_before_shard_batch_with_auto_values_is_refused_naming_seq_len(pool, auto_gpu_kib):
    results = pool.run(cases.auto_from_first_batch, *AUTO_TOPOLOGY, auto_gpu_kib, [[SEQ, SEQ]],
                       without_shard_batch=True, timeout=300)
    errors = [r["error"] for r in results]
    assert len(set(errors)) == 1 and errors[0].startswith("LongContextConfigError"), errors
    assert "still \"auto\"" in errors[0] and "engine.long_context.shard_batch(batch)" in errors[0]
    assert "set long_context.seq_len" in errors[0]
