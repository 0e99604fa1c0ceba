"""Checkpoint offload (``ds_longctx.memory.checkpoint_offload``): the saved inputs of checkpointed layers wait in
host memory from forward to backward, each fetched back a layer ahead, with the gradients of plain checkpointing."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.utils.checkpoint

from ds_longctx.memory import HostPool
from ds_longctx.memory.checkpoint_offload import CheckpointOffload, _HostCopy

LAYERS, B, S, HID = 4, 2, 32, 16


def _stack(seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(HID), torch.nn.Linear(HID, 2 * HID),
                                                   torch.nn.GELU(), torch.nn.Linear(2 * HID, HID))
                               for _ in range(LAYERS))


def _run(layers, x, offload=None, reentrant=False, on_input=None):
    """A residual stack, each layer checkpointed (under ``offload``'s hooks when given)."""
    for layer in layers:
        if on_input is not None:
            on_input(x)

        def block(h, layer=layer):
            return h + layer(h)

        if offload is None:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant)
        else:
            with offload.hooks():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant)
    return x


def _grads(layers, x):
    return [x.grad] + [p.grad for p in layers.parameters()]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_offloaded_checkpoints_give_the_gradients_of_plain_checkpoints(reentrant):
    want_layers, got_layers = _stack(), _stack()
    x0 = torch.randn(B, S, HID)
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    want = _run(want_layers, xa * 2, reentrant=reentrant)
    want.square().sum().backward()
    pool = HostPool()
    got = _run(got_layers, xb * 2, CheckpointOffload(pool, min_bytes=0), reentrant=reentrant)
    # every layer's input is in host memory until its backward
    assert pool.leased_bytes == LAYERS * B * S * HID * 4
    got.square().sum().backward()
    assert torch.equal(got, want)
    for g, w in zip(_grads(got_layers, xb), _grads(want_layers, xa)):
        assert torch.equal(g, w)
    del got
    gc.collect()
    assert pool.leased_bytes == 0  # every buffer back in the pool, kept for the next step
    assert pool.idle_bytes == LAYERS * B * S * HID * 4


@pytest.mark.parametrize("offloaded", [False, True])
def test_layer_inputs_are_not_held_between_forward_and_backward_when_offloaded(offloaded):
    layers = _stack()
    x = torch.randn(B, S, HID, requires_grad=True)
    inputs = []
    out = _run(layers, x * 1.0, CheckpointOffload(HostPool(), min_bytes=0) if offloaded else None,
               on_input=lambda t: inputs.append(weakref.ref(t)))
    gc.collect()
    alive = [r() is not None for r in inputs]
    # plain checkpointing keeps every layer's input until backward; offloaded, the graph holds none of them
    assert alive == [not offloaded] * LAYERS
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_recompute_of_each_layer_finds_the_next_input_it_needs_already_in_flight(monkeypatch):
    layers = _stack()
    in_flight = []
    get = _HostCopy.get

    def spy(self):
        in_flight.append(0 in self.store._inflight)
        return get(self)

    x = torch.randn(B, S, HID, requires_grad=True)
    out = _run(layers, x * 1.0, CheckpointOffload(HostPool(), min_bytes=0))
    monkeypatch.setattr(_HostCopy, "get", spy)
    out.sum().backward()
    # the last layer's input is fetched on demand; each earlier one was started by the layer after it
    assert in_flight == [False] + [True] * (LAYERS - 1)


def test_small_saved_tensors_and_parameters_stay_where_they_are():
    offload = CheckpointOffload(HostPool(), min_bytes=1024)
    small, large = torch.randn(8), torch.randn(1024)
    param = torch.nn.Parameter(torch.randn(1024))
    assert offload.pack(small) is small and offload.pack(param) is param
    packed = offload.pack(large)
    assert isinstance(packed, _HostCopy)
    assert torch.equal(offload.unpack(packed), large)
    assert torch.equal(offload.unpack(packed), large)  # a second backward (retain_graph) finds it again


def test_a_layer_count_offloads_the_first_layers_of_each_forward_only():
    from ds_longctx.memory.remat import checkpoint

    layers = _stack()
    x = torch.randn(B, S, HID, requires_grad=True)
    expected = torch.autograd.grad(_run(layers, x).sum(), [x, *layers.parameters()])
    pool = HostPool()
    offload = CheckpointOffload(pool=pool, min_bytes=0, max_regions=2)
    for _ in range(2):  # the count starts again with each forward
        h = x
        for layer in layers:
            h = checkpoint(lambda t, layer=layer: t + layer(t), h, offload=offload)
        assert pool.leased_bytes == 2 * B * S * HID * 4  # two layer inputs in host memory, not four
        got = torch.autograd.grad(h.sum(), [x, *layers.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_layers_that_do_not_checkpoint_take_no_offload_region_and_keep_the_gradients():
    """``StashingCheckpoint(checkpoints=False)`` (a layer left out of ``checkpoint_layers``) runs the layer as plain
    autograd: nothing of it goes to the host, and the offload's layer count covers only the checkpointed ones."""
    from functools import partial

    from ds_longctx.memory.remat import StashingCheckpoint

    layers = _stack()
    x = torch.randn(B, S, HID, requires_grad=True)
    expected = torch.autograd.grad(_run(layers, x).sum(), [x, *layers.parameters()])
    pool = HostPool()
    offload = CheckpointOffload(pool=pool, min_bytes=0, max_regions=None)
    inner = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    checkpointed = 2
    wrappers = [StashingCheckpoint(inner, offload=offload, checkpoints=i < checkpointed) for i in range(LAYERS)]
    offload.begin_forward()
    h = x
    for layer, wrapper in zip(layers, wrappers):
        h = wrapper(lambda t, layer=layer: t + layer(t), h)
    assert pool.leased_bytes == checkpointed * B * S * HID * 4  # only the checkpointed layers' inputs
    got = torch.autograd.grad(h.sum(), [x, *layers.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
