"""Layer inputs rebuilt in backward (``ds_longctx.memory.input_recompute``): only every N-th checkpointed layer keeps
its input from forward to backward, the others rerun the layer before them, with exactly the gradients of
plain checkpointing (dropout and host offload included)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from ds_longctx.memory import HostPool
from ds_longctx.memory.checkpoint_offload import CheckpointOffload
from ds_longctx.memory.input_recompute import InputRecompute
from ds_longctx.memory.remat import StashingCheckpoint, checkpoint

LAYERS, B, S, HID = 7, 2, 16, 8


class Block(torch.nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.norm = torch.nn.LayerNorm(HID)
        self.up = torch.nn.Linear(HID, 2 * HID)
        self.down = torch.nn.Linear(2 * HID, HID)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, h, scale=1.0):
        return h + self.dropout(self.down(torch.nn.functional.gelu(self.up(self.norm(h))))) * scale


def _stack(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleList(Block(dropout) for _ in range(LAYERS)).double()


def _run(layers, x, inputs=None, offload=None, unchecked=(), on_input=None, reentrant=False):
    """The stack, each layer checkpointed with the scale bound as a keyword (as transformers binds its
    layers' other arguments), except the ``unchecked`` ones."""

    def inner(fn, *args, **kwargs):
        if reentrant:  # the reentrant checkpoint takes no keywords: bind them
            return torch.utils.checkpoint.checkpoint(lambda h: fn(h, **kwargs), *args, use_reentrant=True)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    for index, layer in enumerate(layers):
        if on_input is not None:
            on_input(x)
        wrapper = StashingCheckpoint(inner, keep_attention_output=False, offload=offload,
                                     checkpoints=index not in unchecked, inputs=inputs)
        x = wrapper(lambda h, layer=layer, scale=1.0: layer(h, scale=scale), x, scale=0.5)
    return x


def _step(layers, x0, seed, **kwargs):
    x = x0.clone().requires_grad_()
    torch.manual_seed(seed)
    out = _run(layers, x * 1.0, **kwargs)
    out.square().sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in layers.parameters()]


@pytest.mark.parametrize("every", [2, 3, LAYERS + 1])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_rebuilt_inputs_give_the_gradients_of_plain_checkpointing(every, dropout, reentrant):
    x0 = torch.randn(B, S, HID, dtype=torch.float64)
    want_out, want = _step(_stack(dropout), x0, seed=5, reentrant=reentrant)
    got_out, got = _step(_stack(dropout), x0, seed=5, inputs=InputRecompute(every), reentrant=reentrant)
    assert torch.equal(got_out, want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_only_every_nth_layer_keeps_its_input(every):
    layers = _stack()
    inputs = []
    x = torch.randn(B, S, HID, dtype=torch.float64, requires_grad=True)
    out = _run(layers, x * 1.0, inputs=InputRecompute(every), on_input=lambda t: inputs.append(weakref.ref(t)))
    gc.collect()
    alive = [r() is not None for r in inputs]
    # the graph holds the input of the first layer of each group of ``every``; the others are freed at once
    assert alive == [i % every == 0 for i in range(LAYERS)]
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_offloaded_kept_inputs_go_to_host_memory_and_rebuilt_ones_take_none():
    x0 = torch.randn(B, S, HID, dtype=torch.float64)
    want_out, want = _step(_stack(), x0, seed=1)
    pool = HostPool()
    layers = _stack()
    x = x0.clone().requires_grad_()
    out = _run(layers, x * 1.0, inputs=InputRecompute(2), offload=CheckpointOffload(pool, min_bytes=0))
    assert pool.leased_bytes == (LAYERS + 1) // 2 * B * S * HID * 8
    out.square().sum().backward()
    assert torch.equal(out.detach(), want_out)
    for g, w in zip([x.grad] + [p.grad for p in layers.parameters()], want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    del out
    gc.collect()
    assert pool.leased_bytes == 0


def test_a_layer_without_checkpoint_starts_a_new_group():
    x0 = torch.randn(B, S, HID, dtype=torch.float64)
    want_out, want = _step(_stack(), x0, seed=2, unchecked=(2,))
    inputs = []
    layers = _stack()
    x = x0.clone().requires_grad_()
    out = _run(layers, x * 1.0, inputs=InputRecompute(2), unchecked=(2,),
               on_input=lambda t: inputs.append(weakref.ref(t)))
    gc.collect()
    # layer 2 keeps everything (no checkpoint); layer 3 starts a group and keeps its input
    assert [r() is not None for r in inputs] == [True, False, True, True, False, True, False]
    out.square().sum().backward()
    for g, w in zip([x.grad] + [p.grad for p in layers.parameters()], want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_the_last_layers_input_is_not_held_after_backward():
    layers = _stack()
    recompute = InputRecompute(2)
    x = torch.randn(B, S, HID, dtype=torch.float64, requires_grad=True)
    seen = []
    out = _run(layers, x * 1.0, inputs=recompute, on_input=lambda t: seen.append(weakref.ref(t)))
    out.sum().backward()
    del out
    gc.collect()
    assert all(r() is None for r in seen[1:])  # the first is x * 1.0, alive in no frame either
    assert recompute._previous is None


def test_the_module_level_checkpoint_rebuilds_inputs_too():
    x0 = torch.randn(B, S, HID, dtype=torch.float64)
    want_out, want = _step(_stack(), x0, seed=3)
    layers = _stack()
    recompute = InputRecompute(2)
    x = x0.clone().requires_grad_()
    h = x * 1.0
    for layer in layers:
        h = checkpoint(lambda t, layer=layer: layer(t, scale=0.5), h, keep_attention_output=False, inputs=recompute)
    h.square().sum().backward()
    assert torch.equal(h.detach(), want_out)
    for g, w in zip([x.grad] + [p.grad for p in layers.parameters()], want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_every_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        InputRecompute(0)
