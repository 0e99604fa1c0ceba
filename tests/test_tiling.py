"""Sequence tiling of position-wise modules (``ds_longctx.memory.tiling``): the result and gradients of the
untiled module, with no intermediate activation of the module kept from forward to backward."""
from __future__ import annotations

import pytest
import torch

from ds_longctx.memory.tiling import tile_module, tiled, untile_module
from tests import deepspeed_cases as cases


class SwiGLU(torch.nn.Module):
    def __init__(self, dim=16, hidden=56):
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def grads(module, x, run):
    module.zero_grad()
    x = x.clone().requires_grad_()
    y = run(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return [y.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("S,tile", [(37, 8), (32, 8), (32, 31), (8, 8), (8, 100)])
def test_tiled_module_gives_the_untiled_output_and_gradients(S, tile):
    torch.manual_seed(S)
    mlp = SwiGLU().double()
    x = torch.randn(2, S, 16, dtype=torch.float64)
    want = grads(mlp, x, mlp)
    got = grads(mlp, x, lambda t: tiled(mlp, t, tile))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def _saved_bytes(run, x):
    """Bytes of the tensors that ``run(x)``'s operations save for backward (distinct storages); a checkpoint's
    own hooks take its operations' tensors, so a tiled run should leave none here."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(x)
    return sum(storages.values())


def test_tiled_forward_saves_no_wide_activation_for_backward():
    mlp = SwiGLU()
    x = torch.randn(1, 256, 16, requires_grad=True)
    untiled = _saved_bytes(mlp, x)
    kept = _saved_bytes(lambda t: tiled(mlp, t, 32), x)
    input_and_weights = x.numel() * 4 + sum(p.numel() * 4 for p in mlp.parameters())
    assert untiled > 3 * 256 * 56 * 4  # gate, up, silu(gate): [S, hidden] each
    assert kept <= input_and_weights


def test_tiling_a_module_keeps_its_hooks_and_can_be_undone():
    mlp = SwiGLU()
    calls = []
    mlp.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    x = torch.randn(1, 20, 16)
    want = mlp(x)
    tile_module(mlp, 6)
    assert torch.allclose(mlp(x), want, atol=1e-6)
    assert calls == ["pre", "pre"]
    untile_module(mlp)
    assert "forward" not in mlp.__dict__


def test_tile_size_must_be_positive():
    with pytest.raises(ValueError, match="positive number of tokens"):
        tiled(torch.nn.Identity(), torch.zeros(1, 4, 2), 0)


def test_hf_model_with_tiled_mlps_gives_its_own_logits_and_gradients():
    from ds_longctx.config import LongContextConfig
    from ds_longctx.integration.context import LongContext
    from ds_longctx.integration.hf import apply
    from ds_longctx.topology import Topology

    model = cases.build_model("llama", 32).double()
    reference = cases.build_model("llama", 32).double()
    reference.set_attn_implementation("sdpa")
    # lean_rms_norm off: the model's own norms (fp32 inside, whatever the dtype), so only the tiling differs
    apply(model, LongContext(Topology(), LongContextConfig.from_block({"kernel": "reference", "mlp_tile_tokens": 5,
                                                                       "lean_rms_norm": False})))
    assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    ids = cases.full_batch(0, 0, 2, 32)["input_ids"]
    got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-12
    got.square().mean().backward()
    want.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert ((p.grad - q.grad).norm() / q.grad.norm()).item() < 1e-10, name
