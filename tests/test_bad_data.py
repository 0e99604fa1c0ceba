"""Bad data (token ids outside the vocabulary, ranks of a sequence-parallel group given different batches,
position ids out of order) raises a clear error on every rank before any collective of the model, and the
run can go on: nothing hangs and the process groups still work (4 gloo ranks, dp 2 x ring 2); nothing of a
DeepSpeed run is lost: its last checkpoint, saved before the bad batch, loads and continues it exactly."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from ds_longctx.integration.batch_checks import position_problem, value_problem
from ds_longctx.integration.checkpoints import complete_steps, load_newest_complete, save_complete
from tests import dist_cases

VOCAB, SEQ = 96, 32
TRAIN_SEQ = 48  # the DeepSpeed run's sequence (its model's vocabulary is tests/deepspeed_cases.py's)


def _batch(seed: int, seq: int = SEQ) -> dict:
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def bad_batch_on_rank_3(case: str) -> dict:
    """Every rank: shard a batch that is bad on rank 3 only (ring position 1 of replica 1); return what each
    rank raised, whether a world collective still works afterwards, and whether a good batch then shards."""
    from ds_longctx.integration.data import shard_batch

    topo = dist_cases.topology(1, 2)
    batch = _batch(topo.dp_rank)
    if topo.rank == 3:
        if case == "token_outside_vocab":
            batch["input_ids"][0, 5] = VOCAB
        elif case == "negative_token":
            batch["input_ids"][0, 3] = -1
        elif case == "label_outside_vocab":
            batch["labels"][0, 7] = 1000
        elif case == "longer_batch_in_group":
            batch = _batch(topo.dp_rank, 2 * SEQ)
        elif case == "other_tokens_in_group":
            batch = _batch(99)
        elif case == "zigzag_positions":
            batch["position_ids"] = torch.cat([torch.arange(8), torch.arange(24, 32), torch.arange(8, 24)])[None]
        elif case == "negative_positions":
            batch["position_ids"] = (torch.arange(SEQ) - 1)[None]
        else:
            raise ValueError(case)
    try:
        shard_batch(batch, topo, vocab_size=VOCAB)
        raised = "no error"
    except Exception as exc:  # noqa: BLE001 - returned to the test
        raised = f"{type(exc).__name__}: {exc}"
    probe = torch.ones(1)
    dist.all_reduce(probe)  # every rank left shard_batch: none waits in a collective
    again = shard_batch(_batch(topo.dp_rank), topo, vocab_size=VOCAB)
    return {"raised": raised, "probe": probe.item(), "again": tuple(again["input_ids"].shape)}


CASES = {
    "token_outside_vocab": "input_ids holds ids outside the model's vocabulary [0, 96): 96 at [0, 5]",
    "negative_token": "input_ids holds ids outside the model's vocabulary [0, 96): -1 at [0, 3]",
    "label_outside_vocab": "labels holds ids outside the model's vocabulary [0, 96) or -100: 1000 at [0, 7]",
    "longer_batch_in_group": "sequence-parallel group [2, 3] hold different batches: input_ids [1, 32] on rank 2 "
                             "but [1, 64] on rank 3",
    "other_tokens_in_group": "different tokens on rank 2 and rank 3 (same shape [1, 32])",
    "zigzag_positions": "position_ids jump from 7 to 24 at row 0, index 8",
    "negative_positions": "position_ids hold negative values (min -1)",
}


def bad_batch_after_a_checkpoint(save_dir: str) -> dict:
    """Every rank: ZeRO-3 training of a tiny Llama (dp 2 x ring 2) saves a complete checkpoint after step 2
    and trains step 3; a batch with a token outside the vocabulary on rank 3 then raises; a fresh engine of
    other initial weights loads the newest complete checkpoint and trains step 3 again."""
    import ds_longctx
    from tests import deepspeed_cases as cases

    os.environ.setdefault("LOCAL_RANK", "0")

    def engine_for(seed):
        model = cases.build_model("llama", TRAIN_SEQ, seed)
        config = cases.ds_config(1, 2, 1, optim="adamw")
        return ds_longctx.initialize(model=model, model_parameters=model.parameters(), config=config)[0]

    def train_step(engine, step, poison=False):
        lc = engine.long_context
        batch = cases.full_batch(step, lc.topology.dp_rank, 1, TRAIN_SEQ)
        if poison and lc.topology.rank == 3:
            batch["input_ids"][0, 5] = cases.VOCAB
        batch = lc.shard_batch(batch)
        loss = lc.loss(engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
                       batch["shift_labels"])
        engine.backward(loss)
        engine.step()
        return loss.item()

    engine = engine_for(seed=0)
    for step in range(2):
        train_step(engine, step)
    save_complete(engine, save_dir, 2)
    uninterrupted = train_step(engine, 2)
    try:
        train_step(engine, 3, poison=True)
        raised = "no error"
    except Exception as exc:  # noqa: BLE001 - returned to the test
        raised = f"{type(exc).__name__}: {exc}"
    engine.destroy()
    engine = engine_for(seed=1)
    resumed = load_newest_complete(engine, save_dir)
    again = train_step(engine, 2)
    engine.destroy()
    return {"raised": raised, "resumed_step": resumed.step, "uninterrupted": uninterrupted, "again": again}


def test_after_a_bad_batch_the_last_checkpoint_loads_and_continues_the_run_exactly(dist_pools, tmp_path):
    results = dist_pools(4).run(bad_batch_after_a_checkpoint, str(tmp_path / "ckpt"), timeout=240)
    assert all(r["raised"].startswith("BatchError") and "outside the model's vocabulary" in r["raised"]
               for r in results), [r["raised"] for r in results]
    assert all(r["resumed_step"] == 2 and r["again"] == r["uninterrupted"] for r in results), results
    assert complete_steps(str(tmp_path / "ckpt")) == [2]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_on_one_rank_raises_the_same_error_on_every_rank_and_the_run_goes_on(dist_pools, case):
    results = dist_pools(4).run(bad_batch_on_rank_3, case, timeout=60)
    raised = [r["raised"] for r in results]
    assert all(r.startswith("BatchError") and CASES[case] in r for r in raised), raised
    assert all(r["probe"] == 4.0 and r["again"] == (1, SEQ // 2) for r in results), results


def test_good_values_pass_and_packed_positions_restart_at_zero():
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = ids.clone()
    labels[:, :4] = -100
    packed = torch.cat([torch.arange(5), torch.arange(11)])[None]
    assert value_problem({"input_ids": ids, "labels": labels, "position_ids": packed}, VOCAB, -100) is None
    assert value_problem({"input_ids": ids + VOCAB}, None, -100) is None  # no vocabulary known: not checked
    assert "restart only at 0" in position_problem(torch.cat([torch.arange(5), torch.arange(3, 14)])[None])
    assert "must be integers" in position_problem(torch.arange(16.0)[None])


def test_initialize_takes_the_vocabulary_from_a_transformers_model():
    import transformers

    from ds_longctx.integration.deepspeed import _vocab_size

    config = transformers.LlamaConfig(vocab_size=77, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    assert _vocab_size(transformers.LlamaForCausalLM(config)) == 77
    assert _vocab_size(torch.nn.Linear(2, 2)) is None
