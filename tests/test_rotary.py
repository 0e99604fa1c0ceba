"""The rotary embedding in compiled kernels: transformers' values and gradients, the projections' layout kept,
used only inside the attention modules switched on, and switched on by the block."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from ds_longctx.config import LongContextConfig
from ds_longctx.integration import hf_rotary
from ds_longctx.integration.hf_rotary import ROTARY_ATTENTION_CLASSES, RotaryFusedForward, fuse_rotary, rotary

transformers = pytest.importorskip("transformers")

FAMILIES = {"LlamaAttention": "llama", "Qwen2Attention": "qwen2", "Qwen3Attention": "qwen3",
            "MistralAttention": "mistral"}


def modeling(name):
    family = FAMILIES[name]
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def original_rope(name="LlamaAttention"):
    fn = modeling(name).apply_rotary_pos_emb
    return getattr(fn, "_ds_longctx_original", fn)


def projected(batch=2, heads=4, kv_heads=2, seq=19, dim=16, dtype=torch.float64, seed=0):
    """q, k as the attention modules make them (a [B, S, H, D] projection viewed as [B, H, S, D]), cos, sin."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim, generator=gen, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, dim, generator=gen, dtype=dtype).transpose(1, 2)
    angles = torch.rand(batch, seq, dim // 2, generator=gen, dtype=torch.float64) * 50
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


def test_every_module_it_switches_rotates_with_llamas_function():
    # the fused function is only right for modules whose function computes exactly this: guard against an
    # upstream change
    llama = inspect.getsource(original_rope())
    assert set(ROTARY_ATTENTION_CLASSES) == set(FAMILIES)
    for name in ROTARY_ATTENTION_CLASSES:
        assert inspect.getsource(original_rope(name)) == llama, name


def test_rotary_gives_transformers_values_and_gradients_in_float64():
    q, k, cos, sin = projected()
    q.requires_grad_()
    k.requires_grad_()
    up_q, up_k = torch.randn_like(q), torch.randn_like(k)
    want = original_rope()(q, k, cos, sin)
    want_grads = torch.autograd.grad(want, (q, k), (up_q, up_k))
    got = rotary(q, k, cos, sin)
    got_grads = torch.autograd.grad(got, (q, k), (up_q, up_k))
    for g, w in zip((*got, *got_grads), (*want, *want_grads)):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() < 1e-13


def test_outputs_and_gradients_keep_the_projections_layout():
    q, k, cos, sin = projected()
    q.requires_grad_()
    k.requires_grad_()
    rq, rk = rotary(q, k, cos, sin)
    assert rq.stride() == q.stride() and rk.stride() == k.stride()  # [B, S, H, D] in memory: no copy after
    # the attention's gradient arrives in that layout too
    dq, dk = torch.autograd.grad((rq, rk), (q, k), (torch.randn_like(q), torch.randn_like(k)))
    assert dq.stride() == q.stride() and dk.stride() == k.stride()


def test_in_bf16_each_value_is_rounded_once_and_within_one_step_of_transformers():
    q, k, cos, sin = projected(batch=1, heads=8, kv_heads=2, seq=512, dim=64, dtype=torch.bfloat16)
    got_q, got_k = rotary(q, k, cos, sin)
    eager_q, eager_k = original_rope()(q, k, cos, sin)
    exact_q, exact_k = original_rope()(q.double(), k.double(), cos.double(), sin.double())
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    for x, got, eager, exact in ((q, got_q, eager_q, exact_q), (k, got_k, eager_k, exact_k)):
        step = exact.abs() * 2 ** -7 + 1e-30
        assert ((got.double() - exact).abs() / step).max().item() <= 0.5 + 1e-6  # rounded once, to nearest
        # the eager path rounds both products and their sum: within one step of the terms' magnitude of the
        # exact value (where the terms cancel, many of the result's), so within 1.5 of ours
        x, half = x.double(), x.shape[-1] // 2
        terms = (x * c).abs() + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s).abs()
        assert ((got.double() - eager.double()).abs() / (terms * 2 ** -7 + 1e-30)).max().item() <= 1.5 + 1e-6


def attention_module(name, dtype=torch.float64):
    torch.manual_seed(0)
    config_class = getattr(transformers, name.replace("Attention", "Config"))
    config = config_class(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          intermediate_size=96, attn_implementation="sdpa")
    return modeling(name).__dict__[name](config, layer_idx=0).to(dtype), config


def attention_grads(module, config, name, seq=21, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(2, seq, config.hidden_size, dtype=torch.float64, requires_grad=True)
    rotary_embedding = modeling(name).__dict__[name.replace("Attention", "RotaryEmbedding")](config)
    position_ids = torch.arange(seq).unsqueeze(0).expand(2, -1)
    cos, sin = rotary_embedding(x, position_ids)
    out, _ = module(x, position_embeddings=(cos, sin), attention_mask=None)
    out.backward(torch.randn_like(out))
    return [out.detach(), x.grad, *[p.grad.clone() for p in module.parameters()]]


@pytest.mark.parametrize("name", ROTARY_ATTENTION_CLASSES)
def test_a_switched_attention_module_gives_its_own_values_and_gradients(name, monkeypatch):
    module, config = attention_module(name)
    want = attention_grads(module, config, name)
    module.zero_grad()
    calls = []
    monkeypatch.setattr(hf_rotary, "rotary", lambda *a: calls.append(1) or rotary(*a))
    assert fuse_rotary(module) == 1
    assert isinstance(module.forward, RotaryFusedForward)
    got = attention_grads(module, config, name)
    assert calls == [1]
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() < 1e-13


def test_other_modules_in_the_process_keep_transformers_rotary(monkeypatch):
    switched, config = attention_module("LlamaAttention")
    other, _ = attention_module("LlamaAttention")
    fuse_rotary(switched)
    calls = []
    monkeypatch.setattr(hf_rotary, "rotary", lambda *a: calls.append(1) or rotary(*a))
    attention_grads(other, config, "LlamaAttention")
    assert calls == []
    attention_grads(switched, config, "LlamaAttention")
    assert calls == [1]


def test_switching_off_restores_the_modules_own_forward_and_a_later_wrapper_stays():
    module, config = attention_module("LlamaAttention")
    fuse_rotary(module)
    assert fuse_rotary(module) == 0  # once
    fuse_rotary(module, enabled=False)
    assert "forward" not in module.__dict__
    fuse_rotary(module)
    later = module.forward

    def outer(*args, **kwargs):
        return later(*args, **kwargs)

    module.forward = outer
    fuse_rotary(module, enabled=False)
    assert module.forward is outer and later.enabled is False


def test_the_block_switches_the_models_attention_and_defaults_to_its_own():
    from ds_longctx.integration.context import LongContext
    from ds_longctx.integration.hf import apply
    from ds_longctx.topology import Topology
    from tests import deepspeed_cases as cases

    assert LongContextConfig.from_block({}).fused_rope is False
    for block, fused in (({}, False), ({"fused_rope": True}, True)):
        model = cases.build_model("llama", 32)
        apply(model, LongContext(Topology(), LongContextConfig.from_block({"kernel": "reference", **block})))
        assert all(isinstance(layer.self_attn.__dict__.get("forward"), RotaryFusedForward) == fused
                   for layer in model.model.layers)


def test_the_training_bench_puts_the_fused_rotary_in_the_block_only_when_asked():
    from bench.train_config import ds_config, parse_args

    base = ["--out", "x.json", "--mode", "ds_longctx"]
    assert "fused_rope" not in ds_config(parse_args(base)[0], 1)["long_context"]
    block = ds_config(parse_args(base + ["--fused_rope"])[0], 1)["long_context"]
    assert LongContextConfig.from_block(block).fused_rope is True
