"""RMSNorm keeping only its input for backward: transformers' values forward, the same gradient, less memory."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from ds_longctx.memory.norms import RMS_NORM_CLASSES, lean_rms_norms, rms_norm

transformers = pytest.importorskip("transformers")

MODULES = {"LlamaRMSNorm": "llama", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3", "MistralRMSNorm": "mistral"}


def norm_class(name):
    family = MODULES[name]
    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_every_norm_it_replaces_has_llamas_forward():
    # the replacement is only right for norms that compute exactly this: guard against an upstream change
    llama = inspect.getsource(norm_class("LlamaRMSNorm").forward)
    assert set(RMS_NORM_CLASSES) == set(MODULES)
    for name in RMS_NORM_CLASSES:
        assert inspect.getsource(norm_class(name).forward) == llama, name


@pytest.mark.parametrize("name", RMS_NORM_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 64), (1, 19, 3, 16)], ids=["tokens", "per-head"])
def test_forward_equals_the_models_norm_and_gradients_equal_autograds(name, dtype, shape):
    torch.manual_seed(0)
    module = norm_class(name)(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
    x = (torch.randn(shape) * 3 + 0.5).to(dtype).requires_grad_()
    g = torch.randn(shape).to(dtype)

    want = module(x)  # its own forward
    dx_want, dw_want = torch.autograd.grad(want, (x, module.weight), g)
    # tiles of 8 rows: several tiles and a partial last one
    got = rms_norm(x, module.weight, module.variance_epsilon, tile_rows=8)
    dx, dw = torch.autograd.grad(got, (x, module.weight), g)

    assert got.dtype == want.dtype and torch.equal(got, want)  # the same operations on every row
    # the gradient against float64 autograd of the same function: rounding apart, as close as autograd's own
    x64, w64 = x.detach().double().requires_grad_(), module.weight.detach().double().requires_grad_()
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), g.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(dx, dx64) < tol and rel(dw, dw64) < tol
    assert rel(dx, dx64) <= 2 * rel(dx_want, dx64) + 1e-7 and rel(dw, dw64) <= 2 * rel(dw_want, dw64) + 1e-7
    assert dx.dtype == x.dtype and dw.dtype == module.weight.dtype


def test_fused_tiles_compute_the_same_norm_within_one_rounding_and_the_same_gradients():
    torch.manual_seed(1)
    module = norm_class("LlamaRMSNorm")(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
    x = (torch.randn(3, 37, 64) * 3 + 0.5).to(torch.bfloat16).requires_grad_()
    g = torch.randn(3, 37, 64).to(torch.bfloat16)
    eager = rms_norm(x, module.weight, module.variance_epsilon, tile_rows=32)
    dx_eager, dw_eager = torch.autograd.grad(eager, (x, module.weight), g)
    # ragged tiles (111 rows in tiles of 32, then of 50): the compiled functions take any row count
    for tile_rows in (32, 50):
        fused = rms_norm(x, module.weight, module.variance_epsilon, tile_rows=tile_rows, fused=True)
        dx, dw = torch.autograd.grad(fused, (x, module.weight), g)
        step = eager.detach().abs().float() * 2 ** -7  # one bf16 rounding step of each value
        assert fused.dtype == eager.dtype and bool(((fused - eager).abs().float() <= step).all())
        x64, w64 = x.detach().double().requires_grad_(), module.weight.detach().double().requires_grad_()
        y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))
        dx64, dw64 = torch.autograd.grad(y64, (x64, w64), g.double())
        assert rel(dx, dx64) <= 1.5 * rel(dx_eager, dx64) + 1e-6 and rel(dw, dw64) <= 1.5 * rel(dw_eager, dw64) + 1e-6
        assert dx.dtype == x.dtype and dw.dtype == module.weight.dtype


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_a_frozen_weight_gets_no_gradient_and_the_input_the_same_one(fused):
    torch.manual_seed(2)
    weight = (torch.randn(64) * 0.3 + 1).to(torch.bfloat16).requires_grad_()
    x = (torch.randn(2, 21, 64) * 3).to(torch.bfloat16).requires_grad_()
    g = torch.randn(2, 21, 64).to(torch.bfloat16)
    dx_trained, _ = torch.autograd.grad(rms_norm(x, weight, 1e-5, tile_rows=16, fused=fused), (x, weight), g)
    frozen = weight.detach()
    y = rms_norm(x, frozen, 1e-5, tile_rows=16, fused=fused)
    (dx_frozen,) = torch.autograd.grad(y, (x,), g)
    assert torch.equal(dx_frozen, dx_trained) and frozen.grad is None


def test_fused_norms_need_the_lean_norms():
    from ds_longctx.config import LongContextConfig, LongContextConfigError

    with pytest.raises(LongContextConfigError, match="lean_rms_norm true"):
        LongContextConfig.from_block({"lean_rms_norm": False, "fused_norms": True})
    assert LongContextConfig.from_block({"fused_norms": True}).fused_norms


def saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd keeps for backward while ``fn(*args)`` runs, and their dtypes."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(n for n, _ in seen.values()), {d for _, d in seen.values()}


def test_a_norm_keeps_its_input_and_one_float_per_row_instead_of_an_fp32_copy():
    S, D = 4096, 256
    module = norm_class("LlamaRMSNorm")(D).to(torch.bfloat16)
    x = torch.randn(1, S, D, dtype=torch.bfloat16, requires_grad=True)
    activation = S * D * 2

    own, _ = saved_bytes(module, x)
    lean, dtypes = saved_bytes(lambda t: rms_norm(t, module.weight, module.variance_epsilon), x)

    assert own >= 3 * activation  # the fp32 copy of x (2) and the normalized bf16 tensor (1)
    assert lean == activation + S * 4 + D * 2  # x, 1/rms, the weight
    assert dtypes == {torch.bfloat16, torch.float32}


def test_a_decoder_layer_saves_four_activations_less_with_lean_norms():
    # a bf16 Llama layer, MLP tiled: what its recompute keeps for backward, with the model's norms and ours
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=448, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    layer, S = model.model.layers[0], 2048
    x = torch.randn(1, S, 128, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(S)[None]
    pe = model.model.rotary_emb(x, pos)
    run = lambda t: layer(t, position_embeddings=pe, position_ids=pos)  # noqa: E731

    own, _ = saved_bytes(run, x)
    assert lean_rms_norms(model) == 3  # two per layer and the final one
    lean, _ = saved_bytes(run, x)
    assert lean_rms_norms(model, enabled=False) == 0
    back, _ = saved_bytes(run, x)

    activation = S * 128 * 2
    assert own - lean >= 4 * activation  # the fp32 copies of the two norms' inputs
    assert back == own  # switched off: the model's own norms again


def test_tile_rows_must_be_positive():
    with pytest.raises(ValueError, match="tile_rows"):
        rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, tile_rows=0)
