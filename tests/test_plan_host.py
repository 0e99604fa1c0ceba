"""The planner's pinned host memory: the offload pool's buffers exactly, DeepSpeed's offloaded optimizer as torch's
pinned allocator holds it (powers of two), and what stays pageable."""
from __future__ import annotations

from ds_longctx.plan import GIB, ModelSpec, Run, Settings, ZeroSettings, estimate, rates_for
from ds_longctx.plan.estimate import estimate_host, pool_buffers
from ds_longctx.plan.offload_optimizer import (offload_optimizer_host, parameter_numels, power_of_two_ceil,
                                               sub_group_numels)

LLAMA_3B = ModelSpec(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, head_dim=128, vocab=128256,
                     tied_embeddings=True)
ONE_LAYER_8B = ModelSpec(layers=1, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=256,
                         tied_embeddings=False)
OFFLOAD = ZeroSettings(optimizer_offload=True)


def test_parameters_are_listed_in_the_order_and_sizes_of_the_model():
    numels = parameter_numels(LLAMA_3B)
    assert sum(numels) == LLAMA_3B.params == 3_212_749_824  # the count bench_train recorded
    assert numels[0] == 128256 * 3072 and len(numels) == 1 + 28 * 9 + 1  # tied: no separate head
    assert sum(parameter_numels(ONE_LAYER_8B)) == 220_213_248


def test_sub_groups_close_at_the_parameter_that_reaches_the_size():
    assert sub_group_numels([5, 5, 5], 7) == [10, 5]
    assert sub_group_numels([5, 5, 5], 5) == [5, 5, 5]
    assert sub_group_numels([5, 5, 5], 100) == [15]


def test_the_offloaded_optimizer_pins_what_an_h200_measured():
    # bench/results/plan_h200x1.json (torch 2.11, DeepSpeed 0.19.8, one GPU): torch's pinned allocator held 77 GiB
    # for 3b_full_131k, of which the pool's 56 buffers of 768 MiB took 56 GiB (1 GiB each), and 45.625 GiB for
    # 1l_1m_all_offload, of which the pool's power-of-two buffers took 44.125
    big = offload_optimizer_host(LLAMA_3B, 1, OFFLOAD)
    assert big.pinned == 21 * GIB
    assert big.pinned_gradients == (4 + 4 + 4 + 1) * GIB  # four fp32 sub-groups of about 1e9 parameters
    assert big.pinned_gradient_partitions == 8 * GIB      # 6.0 GiB of bf16 gradients
    assert offload_optimizer_host(ONE_LAYER_8B, 1, OFFLOAD).pinned == int(1.5 * GIB)
    assert big.pageable == 12 * LLAMA_3B.params  # fp32 master weights and Adam's moments


def test_without_pin_memory_the_optimizer_pins_nothing_and_the_host_still_counts_it():
    unpinned = ZeroSettings.from_ds_config({"zero_optimization": {"offload_optimizer": {"device": "cpu",
                                                                                         "pin_memory": False}}})
    host = offload_optimizer_host(LLAMA_3B, 1, unpinned)
    assert host.pinned == 0 and host.pageable == (12 + 4 + 2) * LLAMA_3B.params
    run = Run(model=LLAMA_3B, world=1, seq_len=8192)
    est = estimate(run, Settings(zero=unpinned), rates_for("NVIDIA H200"))
    assert "optimizer_offload" not in est.host_components and est.host_other > host.pageable


def test_the_ds_config_sets_sub_groups_pinning_and_the_gradient_dtype():
    zero = ZeroSettings.from_ds_config({"zero_optimization": {"sub_group_size": 100, "offload_optimizer": {
        "device": "cpu"}}, "data_types": {"grad_accum_dtype": "fp32"}})
    assert (zero.optimizer_offload, zero.sub_group_size, zero.optimizer_pin_memory, zero.grad_accum_bytes) == (
        True, 100, True, 4)
    small_groups = offload_optimizer_host(LLAMA_3B, 8, zero)
    per_rank = sum(-(-n // 8) for n in parameter_numels(LLAMA_3B))
    assert small_groups.pinned_gradient_partitions == power_of_two_ceil(4 * per_rank)
    # every parameter's partition reaches 100 elements: one sub-group, one rounded fp32 buffer, per parameter
    assert small_groups.pinned_gradients == sum(power_of_two_ceil(4 * -(-n // 8)) for n in parameter_numels(LLAMA_3B))


def test_the_pool_is_predicted_to_the_byte_and_as_torch_rounded_it_before():
    # 3b_full_262k_partial: 14 checkpoints and 28 kept outputs of 1.5 GiB, FPDT chunks of one layer
    run = Run(model=LLAMA_3B, world=1, seq_len=262144)
    settings = Settings(chunk_size=65536, fpdt_offload=True, checkpoint_offload_layers=14, mlp_tile_tokens=16384,
                        loss_tile_tokens=4096)
    exact = estimate_host(run, settings)
    assert exact["checkpoint_offload"] == 14 * 262144 * 3072 * 2
    assert sum(b.count * b.nbytes for b in pool_buffers(run, settings)) == sum(exact.values())
    then = estimate_host(run, settings, pool_in_torch_allocator=True)
    assert then["checkpoint_offload"] == 14 * 2 * GIB
    # measured then: 91.03 GiB pinned (the lse buffers, 0.9 GiB here, stayed on the GPU)
    assert abs(sum(then.values()) / GIB - 91.03) < 0.03 * 91.03


def test_the_offload_pool_may_pin_the_hosts_memory_less_what_the_offloaded_optimizer_pins():
    from ds_longctx.integration.deepspeed import _pool_limit
    from ds_longctx.integration.planning import PlanInputs
    from ds_longctx.plan import Machine

    config = {"num_hidden_layers": 28, "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 128}
    machine = Machine(gpus=1, gpu_memory=int(139.8 * GIB), host_memory=120 * GIB, gpu_name="NVIDIA H200")
    offloaded = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    inputs = lambda ds, model=config: PlanInputs(model_config=model, ds=ds, world=1, machine=machine,  # noqa: E731
                                                 micro_batch=1, checkpointing=True)

    assert _pool_limit(machine, inputs(offloaded)) == 120 * GIB - 21 * GIB  # the 3B's 21 GiB measured on an H200
    assert _pool_limit(machine, inputs({"zero_optimization": {"stage": 3}})) == 120 * GIB
    assert _pool_limit(machine, inputs(offloaded, model=None)) == 120 * GIB  # not a transformers model: no plan
