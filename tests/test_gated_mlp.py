"""The SiLU-gated MLP in compiled kernels: the model's values and gradients, one activation less kept, composed with
sequence tiling in either order, and switched on by the block."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from ds_longctx.config import LongContextConfig
from ds_longctx.memory.gated_mlp import GATED_MLP_CLASSES, FusedGatedMLPForward, fuse_gated_mlps, swiglu
from ds_longctx.memory.tiling import TiledForward, tile_module, untile_module
from tests.test_norms import saved_bytes

transformers = pytest.importorskip("transformers")

FAMILIES = {"LlamaMLP": "llama", "Qwen2MLP": "qwen2", "Qwen3MLP": "qwen3", "MistralMLP": "mistral"}


def mlp_class(name):
    family = FAMILIES[name]
    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


def llama_mlp(dtype=torch.float64, hidden=32, intermediate=80):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    return mlp_class("LlamaMLP")(config).to(dtype)


def grads_of(module, x, seed=1):
    torch.manual_seed(seed)
    x = x.detach().requires_grad_()
    out = module(x)
    out.backward(torch.randn_like(out))
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


def test_every_mlp_it_replaces_has_llamas_forward():
    # the replacement is only right for MLPs that compute exactly this: guard against an upstream change
    llama = inspect.getsource(mlp_class("LlamaMLP").forward)
    assert set(GATED_MLP_CLASSES) == set(FAMILIES)
    for name in GATED_MLP_CLASSES:
        assert inspect.getsource(mlp_class(name).forward) == llama, name


def test_swiglu_gives_silu_gate_times_up_and_its_gradients_in_float64():
    torch.manual_seed(0)
    gate = (torch.randn(3, 17, 40, dtype=torch.float64) * 3).requires_grad_()
    up = torch.randn(3, 17, 40, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 17, 40, dtype=torch.float64)
    want = torch.nn.functional.silu(gate) * up
    want_grads = torch.autograd.grad(want, (gate, up), upstream)
    got = swiglu(gate, up)
    got_grads = torch.autograd.grad(got, (gate, up), upstream)
    assert (got - want).abs().max().item() < 1e-14
    for g, w in zip(got_grads, want_grads):
        assert ((g - w).norm() / w.norm()).item() < 1e-14


def test_in_bf16_the_product_is_within_one_rounding_step_of_the_eager_one():
    torch.manual_seed(0)
    gate = (torch.randn(4096, 64) * 3).to(torch.bfloat16)
    up = torch.randn(4096, 64).to(torch.bfloat16)
    eager = torch.nn.functional.silu(gate) * up
    exact = torch.nn.functional.silu(gate.double()) * up.double()
    got = swiglu(gate, up)
    step = exact.abs() * 2 ** -7 + 1e-30
    assert ((got.double() - exact).abs() / step).max().item() <= 0.5 + 1e-6  # rounded once, to nearest
    assert ((got.double() - eager.double()).abs() / step).max().item() <= 1.0 + 1e-6


@pytest.mark.parametrize("name", GATED_MLP_CLASSES)
def test_a_switched_mlp_gives_its_own_values_and_gradients(name):
    torch.manual_seed(0)
    config_class = getattr(transformers, name.replace("MLP", "Config"))
    config = config_class(hidden_size=32, intermediate_size=80, hidden_act="silu")
    module = mlp_class(name)(config).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    want = grads_of(module, x)
    module.zero_grad()
    assert fuse_gated_mlps(module) == 1
    assert isinstance(module.forward, FusedGatedMLPForward)
    got = grads_of(module, x)
    assert (got[0] - want[0]).abs().max().item() < 1e-13
    for g, w in zip([got[1], *got[2]], [want[1], *want[2]]):
        assert ((g - w).norm() / w.norm()).item() < 1e-13


def test_the_gating_keeps_gate_and_up_but_not_silu_of_the_gate():
    module = llama_mlp(torch.bfloat16, hidden=64, intermediate=256)
    S = 2048
    x = torch.randn(1, S, 64, dtype=torch.bfloat16, requires_grad=True)
    own, _ = saved_bytes(module, x)
    fuse_gated_mlps(module)
    fused, _ = saved_bytes(module, x)
    assert own - fused == S * 256 * 2  # one [S, intermediate] bf16 activation less
    fuse_gated_mlps(module, enabled=False)
    assert "forward" not in module.__dict__
    assert saved_bytes(module, x)[0] == own


@pytest.mark.parametrize("fuse_first", [True, False], ids=["fused-then-tiled", "tiled-then-fused"])
def test_tiles_run_the_fused_gating_whichever_was_set_first(fuse_first):
    module = llama_mlp()
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    want = grads_of(module, x)
    module.zero_grad()
    calls = []
    original = FusedGatedMLPForward.__call__

    def counted(self, t):
        calls.append(t.shape[1])
        return original(self, t)

    steps = [lambda: fuse_gated_mlps(module), lambda: tile_module(module, 16)]
    for step in (steps if fuse_first else steps[::-1]):
        step()
    assert isinstance(module.forward, TiledForward)
    FusedGatedMLPForward.__call__ = counted
    try:
        got = grads_of(module, x)
    finally:
        FusedGatedMLPForward.__call__ = original
    assert calls[:3] == [16, 16, 8]  # the forward's tiles (their recompute in backward follows)
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        assert ((g - w).norm() / w.norm()).item() < 1e-13
    untile_module(module)
    assert isinstance(module.forward, FusedGatedMLPForward)  # untiled, still fused


def test_the_block_switches_the_models_mlps_and_defaults_to_their_own():
    from ds_longctx.integration.context import LongContext
    from ds_longctx.integration.hf import apply
    from ds_longctx.topology import Topology
    from tests import deepspeed_cases as cases

    assert LongContextConfig.from_block({}).fused_gated_mlp is False
    for block, fused in (({}, False), ({"fused_gated_mlp": True}, True),
                         ({"fused_gated_mlp": True, "mlp_tile_tokens": 8}, True)):
        model = cases.build_model("llama", 32)
        apply(model, LongContext(Topology(), LongContextConfig.from_block({"kernel": "reference", **block})))
        mlps = [layer.mlp for layer in model.model.layers]
        assert all(isinstance(m.__dict__.get("_ds_longctx_base_forward"), FusedGatedMLPForward) == fused
                   for m in mlps)


def test_the_training_bench_puts_the_fused_gating_in_the_block_only_when_asked():
    from bench.train_config import ds_config, parse_args

    base = ["--out", "x.json", "--mode", "ds_longctx"]
    assert "fused_gated_mlp" not in ds_config(parse_args(base)[0], 1)["long_context"]
    block = ds_config(parse_args(base + ["--fused_gated_mlp"])[0], 1)["long_context"]
    assert LongContextConfig.from_block(block).fused_gated_mlp is True
