"""LongContextTrainer (transformers' Trainer with the block of its DeepSpeed config) on 4 gloo CPU processes
trains, logs and evaluates exactly like plain Trainer in one process on the step's whole batch.

All cases share one pool of 4 workers (each launch costs the torch/transformers/deepspeed imports).
"""
from __future__ import annotations

import os

import pytest
import torch

from tests import trainer_cases as cases
from tests.distpool import DistPool

pytest.importorskip("accelerate")

WORLD = 4
RTOL = 1e-5  # fp32: relative to each tensor's norm


@pytest.fixture(scope="module")
def pool():
    p = DistPool(WORLD)
    yield p
    p.close()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_same_training(results, ref, sp: int, steps: int):
    initial = cases.build_model("llama", cases.SEQ).state_dict()
    for res in results:
        assert res["info"] == {"world": WORLD, "dp": WORLD // sp, "attn_impl": "ds_longctx", "sp": sp}
        # logged per-step loss and evaluation loss: the whole step's, as one process logs them
        assert len(res["losses"]) == steps
        assert res["losses"] == pytest.approx(ref["losses"], rel=RTOL)
        assert res["eval_loss"] == pytest.approx(ref["eval_loss"], rel=RTOL)
        # tokens seen count each sample once, not once per rank of its sequence-parallel group
        assert res["tokens_seen"] == ref["tokens_seen"]
    final = results[0]["params"]
    assert set(final) == set(ref["params"])
    for name, want in ref["params"].items():
        if not name.endswith("norm.weight"):  # (norm weights move little at this rate)
            assert rel(initial[name], want) > 100 * RTOL, name  # training moved the weights beyond the tolerance
        assert rel(final[name], want) < RTOL, f"{name}: rel error {rel(final[name], want):.2e}"


# (ulysses, ring, packed, gradient accumulation, memory features): dp = 4 / (U x R)
CASES = [(1, 2, False, 2, False), (2, 1, True, 1, False), (2, 2, True, 2, True)]


@pytest.mark.parametrize("ulysses,ring,packed,accum,memory", CASES,
                         ids=[f"U{u}xR{r}-{'packed' if p else 'rows'}-accum{a}" + ("-memory" if m else "")
                              for u, r, p, a, m in CASES])
def test_trainer_with_long_context_block_trains_like_one_process(pool, tmp_path, ulysses, ring, packed, accum,
                                                                 memory):
    """ZeRO-3 over 4 ranks, samples split over dp replicas only, every batch sharded; padding-free packing
    (DataCollatorWithFlattening, rows padded to the layout's multiple), gradient accumulation, and the
    block's memory features under the Trainer's gradient checkpointing included."""
    sp = ulysses * ring
    steps = 3
    results = pool.run(cases.train_with_trainer, ulysses, ring, str(tmp_path / "dist"), steps=steps,
                       grad_accum=accum, packed=packed, evaluate=True, memory=memory, timeout=600)
    ref = cases.train_single_process(WORLD // sp, str(tmp_path / "ref"), steps=steps, grad_accum=accum,
                                     packed=packed, evaluate=True)
    check_same_training(results, ref, sp, steps)


def test_auto_values_without_seq_len_resolve_at_the_trainers_first_batch_and_train_like_one_process(pool, tmp_path):
    """The Trainer builds the engine without a dataset length; its first sharded batch resolves the block."""
    steps = 2
    results = pool.run(cases.train_with_trainer, 1, 2, str(tmp_path / "dist"), steps=steps, evaluate=True,
                       auto_on_gpu_gib=4.0, timeout=600)
    ref = cases.train_single_process(WORLD // 2, str(tmp_path / "ref"), steps=steps, evaluate=True)
    check_same_training(results, ref, 2, steps)
    for res in results:
        assert "auto" not in (res["block"]["keep_attention_output"], res["block"]["loss_tile_tokens"],
                              res["block"]["fpdt"]["chunk_size"])


def test_resume_from_checkpoint_under_another_factorization_continues_the_run(pool, tmp_path):
    """save_steps writes DeepSpeed checkpoints; resume_from_checkpoint under U x R = 2 x 1 of a run saved under
    1 x 2 (same world) logs the uninterrupted run's losses and ends with its weights."""
    out = str(tmp_path / "run")
    whole = pool.run(cases.train_with_trainer, 1, 2, out, steps=4, save_steps=2, timeout=600)
    checkpoint = os.path.join(out, "checkpoint-2")
    assert os.path.isdir(checkpoint)
    resumed = pool.run(cases.train_with_trainer, 2, 1, str(tmp_path / "resumed"), steps=4,
                       resume_from=checkpoint, timeout=600)
    for full, res in zip(whole, resumed):
        # the first two logged losses come back with the trainer state, the last two are trained again
        assert res["losses"] == pytest.approx(full["losses"], rel=RTOL)
        assert res["tokens_seen"] == full["tokens_seen"]
    for name, want in whole[0]["params"].items():
        assert rel(resumed[0]["params"][name], want) < RTOL, name


def test_trl_sft_trainer_with_long_context_block_trains_like_one_process(pool, tmp_path):
    pytest.importorskip("trl")
    results = pool.run(cases.train_with_trainer, 2, 2, str(tmp_path / "dist"), steps=2, batch_size=2, packed=True,
                       sft=True, timeout=600)
    ref = cases.train_single_process(1, str(tmp_path / "ref"), steps=2, batch_size=2, packed=True, sft=True)
    check_same_training(results, ref, 4, 2)


def test_settings_that_cannot_work_under_sequence_parallelism_are_refused(pool, tmp_path):
    errors = pool.run(cases.trainer_setup_errors, str(tmp_path), timeout=600)
    assert errors[0] == errors[1] == errors[2] == errors[3]
    got = errors[0]
    assert "label_smoothing_factor" in got["label_smoothing"]
    assert "compute_loss_func" in got["loss_func"]
    assert "compute_metrics" in got["metrics"]
    assert "deepspeed" in got["no_deepspeed"]
    assert "predict() is not supported" in got["predict"]


def test_rows_are_padded_to_the_layout_without_changing_targets_or_documents():
    from ds_longctx.integration.data import shift_labels
    from ds_longctx.integration.trainer import pad_to_layout, target_count

    ids = torch.arange(10).reshape(1, 10)
    labels = ids.clone()
    labels[0, :3] = -100
    packed = {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])}
    out = pad_to_layout(packed, 8)
    assert out["input_ids"].shape == (1, 16) and out["labels"][0, 10:].eq(-100).all()
    # the padding is a document of its own: position ids restart at 0 where it begins
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    # the same next-token targets: the last real token had none and still has none
    assert torch.equal(shift_labels(out["labels"])[:, :10], shift_labels(labels))
    assert target_count(out) == target_count(packed) == 7


def test_a_right_padding_mask_without_targets_is_dropped_and_any_other_kept():
    from ds_longctx.integration.trainer import pad_to_layout

    ids = torch.arange(8).reshape(2, 4)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[0, 1, 2, 3], [4, 5, -100, -100]])
    assert "attention_mask" not in pad_to_layout({"input_ids": ids, "labels": labels, "attention_mask": right}, 4)
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kept = pad_to_layout({"input_ids": ids, "labels": labels, "attention_mask": left}, 4)
    assert torch.equal(kept["attention_mask"], left)  # shard_batch then refuses it with what to change
    targets_on_padding = pad_to_layout({"input_ids": ids, "labels": ids, "attention_mask": right}, 4)
    assert torch.equal(targets_on_padding["attention_mask"], right)
