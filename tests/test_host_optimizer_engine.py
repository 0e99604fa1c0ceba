"""``long_context.host_optimizer_states`` through ``ds_longctx.initialize`` and DeepSpeed ZeRO-3: HostStateAdamW
built from the config's optimizer block trains as DeepSpeed's own AdamW, checkpoints and resumes, and what it
cannot honour is refused on every rank before training."""
from __future__ import annotations

import re

import pytest
import torch

from tests import deepspeed_cases as cases

STEPS, SEQ, BATCH = 3, 48, 2


@pytest.mark.parametrize("world,ulysses,ring", [(1, 1, 1), (2, 1, 2)], ids=["1-rank", "2-ranks-R2"])
def test_moments_in_host_memory_train_as_deepspeeds_own_adamw(dist_pools, world, ulysses, ring):
    pool = dist_pools(world)
    theirs = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, STEPS, SEQ, BATCH, optim="adamw",
                      timeout=300)
    ours = pool.run(cases.train_with_deepspeed, "llama", ulysses, ring, STEPS, SEQ, BATCH, optim="adamw",
                    host_optimizer_states=True, timeout=300)
    assert all(r["info"]["basic_optimizer"] == "HostStateAdamW" for r in ours)
    assert all(r["info"]["basic_optimizer"] == "AdamW" for r in theirs)
    assert world == 1 or all(r["info"]["params_partitioned_over_world"] for r in ours)
    # the same single-tensor AdamW arithmetic on the same fp32 partitions: the same bits
    for mine, reference in zip(ours, theirs):
        assert mine["losses"] == reference["losses"]
    assert len(set(ours[0]["losses"])) == STEPS  # the weights moved
    initial = cases.build_model("llama", SEQ).state_dict()
    for name, want in theirs[0]["params"].items():
        assert not torch.equal(initial[name], want), name
        assert torch.equal(ours[0]["params"][name], want), name


def test_a_checkpoint_with_moments_in_host_memory_resumes_where_it_stopped(dist_pools, tmp_path):
    # save after 3 steps, 2 more steps; a fresh engine on other weights loads the checkpoint (moments, step
    # counters, the WarmupLR scheduler built on HostStateAdamW) and repeats the 2 steps bit for bit
    results = dist_pools(2).run(cases.save_and_resume, "llama", 1, 2, str(tmp_path), 3, 2, None,
                                host_optimizer_states=True, timeout=300)
    for res in results:
        assert res["basic_optimizer"] == "HostStateAdamW"
        assert res["restored_steps"] == (3, 2)
        assert res["resumed"] == res["uninterrupted"]
        assert len(set(res["uninterrupted"])) == 2
    for name, want in results[0]["saved"].items():
        assert not torch.equal(results[0]["before_load"][name], want), name
        assert torch.equal(results[0]["loaded"][name], want), name


@pytest.mark.parametrize("block,expected", [
    # torch_adam: torch.optim.AdamW, whose weight_decay defaults to 0.01
    ({"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}, (0.1, (0.9, 0.999), 1e-8, 0.01)),
    # DeepSpeed's FusedAdam: weight_decay defaults to 0; "adam" means decoupled weight decay unless adam_w_mode false
    ({"type": "adam", "params": {"betas": [0.8, 0.9], "eps": 1e-6}}, (1e-3, (0.8, 0.9), 1e-6, 0.0)),
    # AdamW is decoupled whatever adam_w_mode says; Adam's L2 mode equals AdamW without weight decay
    ({"type": "AdamW", "params": {"weight_decay": 0.1, "adam_w_mode": False}}, (1e-3, (0.9, 0.999), 1e-8, 0.1)),
    ({"type": "Adam", "params": {"adam_w_mode": False}}, (1e-3, (0.9, 0.999), 1e-8, 0.0)),
])
def test_the_optimizer_block_means_what_deepspeed_makes_of_it(block, expected):
    from ds_longctx.integration.optimizer_block import adamw_hyperparameters

    assert tuple(adamw_hyperparameters({"optimizer": block})) == expected


@pytest.mark.parametrize("params,match", [({"lr": "auto"}, "optimizer.params.lr is 'auto'; give a number"),
                                          ({"betas": [0.9]}, "optimizer.params.betas is [0.9]"),
                                          ({"max_grad_norm": 1.0}, "use the config's gradient_clipping"),
                                          ({"bias_correction": False}, "bias_correction=False is not supported"),
                                          ({"momentum": 0.9}, "['momentum'] are not AdamW parameters")])
def test_optimizer_parameters_host_state_adamw_cannot_honour_are_refused(params, match):
    from ds_longctx.config import LongContextConfigError
    from ds_longctx.integration.optimizer_block import adamw_hyperparameters

    with pytest.raises(LongContextConfigError, match=re.escape(match)):
        adamw_hyperparameters({"optimizer": {"type": "AdamW", "params": params}})


def test_deepspeed_gets_the_optimizer_object_and_a_config_without_the_block_it_was_built_from(tmp_path):
    import argparse

    from ds_longctx.integration.optimizer_block import client_optimizer_kwargs
    from ds_longctx.memory import HostStateAdamW

    ds = cases.ds_config(1, 1, 1, optim="adamw", host_optimizer_states=True)
    ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    ds.pop("zero_allow_untested_optimizer")
    model = cases.build_model("llama", 32)
    args = argparse.Namespace(deepspeed_config=str(tmp_path / "ds.json"), local_rank=0)
    kwargs = client_optimizer_kwargs(ds, model, model.parameters(), args)
    assert isinstance(kwargs["optimizer"], HostStateAdamW)
    group = kwargs["optimizer"].param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.9, 0.95), 0.1)
    assert kwargs["model_parameters"] == list(model.parameters()) == group["params"]
    # DeepSpeed asserts on an optimizer object beside an optimizer block, and on a config in args beside config=
    assert "optimizer" not in kwargs["config"] and kwargs["config"]["scheduler"] == ds["scheduler"]
    assert kwargs["config"]["zero_allow_untested_optimizer"] is True and kwargs["config_params"] is None
    assert kwargs["args"].deepspeed_config is None and kwargs["args"].local_rank == 0
    assert args.deepspeed_config == str(tmp_path / "ds.json")  # the caller's args untouched
    assert "optimizer" in ds


ERRORS = {
    "optimizer_object": "drop the optimizer argument",
    "offload_optimizer": "remove offload_optimizer",
    "no_optimizer_block": "has no optimizer block",
    "unsupported_type": "optimizer type 'SGD' is not supported",
    "adam_with_l2_weight_decay": "set adam_w_mode true or type AdamW",
    "amsgrad": "optimizer.params.amsgrad=True is not supported",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_what_the_host_optimizer_cannot_honour_is_refused_on_every_rank(dist_pools, case):
    raised = dist_pools(2).run(cases.host_optimizer_error, case, timeout=120)
    assert all(r.startswith("LongContextConfigError: long_context.host_optimizer_states: ") for r in raised), raised
    assert all(ERRORS[case] in r and "or set long_context.host_optimizer_states false" in r for r in raised), raised
    assert len(set(raised)) == 1, raised
