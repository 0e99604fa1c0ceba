"""The stash protocol of ``ds_longctx.memory.attention_stash`` and the torch behaviour it relies on: under a
non-reentrant checkpoint the recompute runs when a node's backward first unpacks a saved tensor, so a node
that keeps its state outside autograd saves a token tensor and unpacks it before it reads the state."""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from ds_longctx.memory.attention_stash import keep_for_backward, stash_call, take_for_backward
from ds_longctx.memory.remat import checkpoint


class _Logged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log, save_token):
        log.append("forward")
        ctx.log, ctx.save_token = log, save_token
        if save_token:
            ctx.save_for_backward(torch.empty(0))
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append("backward")
        if ctx.save_token:
            ctx.saved_tensors  # noqa: B018
        ctx.log.append("read state")
        return grad * 2, None, None


def _run(save_token: bool) -> list:
    log = []
    x = torch.ones(3, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lambda t: _Logged.apply(t, log, save_token), x, use_reentrant=False)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    return log


def test_unpacking_a_saved_token_runs_the_recompute_first():
    assert _run(save_token=True) == ["forward", "backward", "forward", "read state"]


def test_a_node_that_saves_nothing_reads_its_state_before_any_recompute():
    assert _run(save_token=False) == ["forward", "backward", "read state"]


class _Stateful(torch.autograd.Function):
    """A node that keeps state outside autograd, as FPDT keeps its chunk stores: built only where the
    backward will read it (outside a stash region, or by the recompute)."""

    @staticmethod
    def forward(ctx, x, built):
        call = stash_call(("stateful", tuple(x.shape)))
        state = None
        if call is None or call.replaying:
            state = {"scale": 3.0, "run": len(built)}
            built.append(state)
        keep_for_backward(ctx, call, state, x.device)
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        state = take_for_backward(ctx)
        if state is None:
            raise RuntimeError("no state")
        state["used"] = True
        return grad * state["scale"], None


def test_the_recompute_hands_its_state_to_the_forwards_node():
    built = []
    x = torch.ones(2, requires_grad=True)
    y = checkpoint(lambda t: _Stateful.apply(t, built) + 1, x, keep_attention_output=False)
    assert built == []  # the forward run of the region keeps nothing
    y.sum().backward()
    assert [s["run"] for s in built] == [0] and built[0].get("used")  # built by the recompute, read once
    assert torch.equal(x.grad, torch.full((2,), 3.0))


def test_outside_a_region_the_node_keeps_its_own_state():
    built = []
    x = torch.ones(2, requires_grad=True)
    _Stateful.apply(x, built).sum().backward()
    assert len(built) == 1 and built[0].get("used")
