"""The planner and ``host_optimizer_states``: AdamW's moments leave the GPU peak for pinned host memory (exact
pages), the step pays their PCIe round trip, and the search takes it only where it is what makes a step fit."""
from __future__ import annotations

import mmap

import pytest
import torch

from ds_longctx.config import LongContextConfig
from ds_longctx.plan import GIB, Machine, ModelSpec, Run, Settings, ZeroSettings, rates_for
from ds_longctx.memory.host_optimizer import STAGING_SLOTS, HostStateAdamW
from ds_longctx.plan.estimate import estimate, estimate_host, estimate_memory
from ds_longctx.plan.host_optimizer import host_moments_bytes
from ds_longctx.plan.offload_optimizer import parameter_numels, sub_group_numels
from ds_longctx.plan.preflight import fixed_fields
from ds_longctx.plan.search import best, candidates
from ds_longctx.plan.verdict import Margins

LLAMA_3B = ModelSpec(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, head_dim=128, vocab=128256,
                     tied_embeddings=True)
H200 = Machine(gpus=1, gpu_memory=int(139.8 * GIB), host_memory=125 * GIB, gpu_name="NVIDIA H200")
# a GPU whose 46.8 GiB usable (less the 10% margin) cannot hold the 3B's 48 GiB of ZeRO state on its own
GPU_52 = Machine(gpus=1, gpu_memory=52 * GIB, host_memory=125 * GIB, gpu_name="NVIDIA H200")
RATES = rates_for("NVIDIA H200")


def _page(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def test_moments_move_from_the_gpu_peak_to_exactly_pinned_host_memory_and_cost_their_transfer():
    for world in (1, 8):
        run = Run(model=LLAMA_3B, world=world, seq_len=65536)
        on_gpu, on_host = Settings(), Settings(host_optimizer_states=True)
        gpu = estimate_memory(run, on_gpu)
        host = estimate_memory(run, on_host)
        params = LLAMA_3B.params
        for moment in gpu:
            assert gpu[moment]["optimizer_states"] == 12 * params // world
            assert host[moment]["optimizer_states"] == 4 * params // world  # the fp32 master stays
            # the three staging slots of both moments of one chunk (2^24 elements: every sub-group is larger)
            assert host[moment]["optimizer_staging"] == STAGING_SLOTS * 8 * (1 << 24)
            assert sum(gpu[moment].values()) - sum(host[moment].values()) == \
                12 * params // world - 4 * params // world - host[moment]["optimizer_staging"]
        partitions = [-(-n // world) for n in parameter_numels(LLAMA_3B)]
        groups = sub_group_numels(partitions, ZeroSettings().sub_group_size)
        assert estimate_host(run, on_host)["optimizer_moments"] == sum(2 * _page(4 * n) for n in groups)
        assert "optimizer_moments" not in estimate_host(run, on_gpu)
        shard = params / world
        slow, fast = estimate(run, on_host, RATES), estimate(run, on_gpu, RATES)
        # the measured rate of the whole streamed step (bench/results/check_host_optimizer_h200x1.json)
        assert slow.time_components["optimizer_step"] == pytest.approx(8 * shard / RATES.moment_stream_bytes)
        assert slow.step_seconds > fast.step_seconds


def test_the_planners_staging_is_host_state_adamws():
    from ds_longctx.memory import host_optimizer
    from ds_longctx.plan import host_optimizer as planned

    assert planned.STAGING_SLOTS == host_optimizer.STAGING_SLOTS
    assert planned.CHUNK_NUMEL == HostStateAdamW([torch.zeros(1, requires_grad=True)]).chunk_numel


def test_the_offload_pool_may_pin_the_hosts_memory_less_the_moments():
    from ds_longctx.integration.deepspeed import _pool_limit
    from ds_longctx.integration.planning import PlanInputs

    config = {"num_hidden_layers": 28, "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 128}
    machine = Machine(gpus=2, gpu_memory=int(139.8 * GIB), host_memory=240 * GIB, gpu_name="NVIDIA H200")
    ds = {"zero_optimization": {"stage": 3}}
    inputs = PlanInputs(model_config=config, ds=ds, world=2, machine=machine, micro_batch=1, checkpointing=True)
    moments = host_moments_bytes(LLAMA_3B, 2, ZeroSettings())
    assert moments >= 8 * LLAMA_3B.params // 2
    assert _pool_limit(machine, inputs, host_optimizer_states=True) == 120 * GIB - moments
    assert _pool_limit(machine, inputs) == 120 * GIB


def test_the_plan_keeps_the_moments_on_the_host_only_where_that_makes_the_step_fit():
    run = Run(model=LLAMA_3B, world=1, seq_len=32768)
    margins = Margins.default(GPU_52)
    winner, _ = best(run, GPU_52, margins)
    assert winner is not None and winner.fits
    assert winner.settings.host_optimizer_states and not winner.settings.zero.optimizer_offload
    # nothing with the moments on the GPU fits, and streaming them beats DeepSpeed's CPU optimizer
    assert best(run, GPU_52, margins, {"host_optimizer_states": False, "optimizer_offload": False})[0] is None
    offloaded, _ = best(run, GPU_52, margins, {"host_optimizer_states": False})
    assert offloaded is None or offloaded.estimate.step_seconds > winner.estimate.step_seconds
    assert LongContextConfig.from_block(winner.settings.block(LLAMA_3B.layers)).host_optimizer_states is True

    roomy, _ = best(run, H200, Margins.default(H200))
    assert roomy is not None and not roomy.settings.host_optimizer_states


def test_the_moments_on_the_host_are_never_planned_with_deepspeeds_optimizer_offload():
    run = Run(model=LLAMA_3B, world=1, seq_len=32768)
    margins = Margins.default(GPU_52)
    chosen = list(candidates(run, GPU_52, margins, {"host_optimizer_states": True}))
    assert chosen and all(s.host_optimizer_states and not s.zero.optimizer_offload for s in chosen)
    # a block that sets it pins it, as it pins DeepSpeed's optimizer offload
    cfg = LongContextConfig.from_block({"host_optimizer_states": True})
    assert fixed_fields(cfg, LLAMA_3B.layers, ZeroSettings())["host_optimizer_states"] is True
    winner, _ = best(run, GPU_52, margins, fixed_fields(LongContextConfig.from_block({}), LLAMA_3B.layers,
                                                        ZeroSettings(optimizer_offload=True)))
    assert winner is None or not winner.settings.host_optimizer_states


def test_with_the_moments_on_the_host_the_plan_offloads_only_the_checkpoints_the_host_still_holds():
    """262K tokens of the 3B on a GPU of 53.9 GiB (0.68x ALST's measured peak there): every layer's checkpoint and
    kept attention output in host memory plus the moments are more than the host holds, the moments on the GPU more
    than it holds. The plan keeps the attention outputs (no attention recompute) with the moments on the host and
    all but the layers that fit on the GPU offloaded; both memories fit."""
    run = Run(model=LLAMA_3B, world=1, seq_len=262144)
    machine = Machine(gpus=1, gpu_memory=int(53.9 * GIB), host_memory=int(124.12 * GIB), gpu_name="NVIDIA H200")
    margins = Margins(gpu=0, host=int(0.10 * machine.host_memory))
    winner, _ = best(run, machine, margins)
    assert winner is not None and winner.fits
    chosen = winner.settings
    assert chosen.host_optimizer_states and chosen.keep_attention_output
    assert 0 < chosen.checkpoint_offload_layers < LLAMA_3B.layers
    every_layer = chosen.with_(checkpoint_offload_layers=LLAMA_3B.layers)
    from ds_longctx.plan.verdict import judge
    assert not judge(run, every_layer, machine, margins).fits_host
    assert not judge(run, chosen.with_(host_optimizer_states=False), machine, margins).fits_gpu
    # recomputing the attention instead is slower
    recompute, _ = best(run, machine, margins, {"keep_attention_output": False})
    assert recompute.estimate.step_seconds > winner.estimate.step_seconds
