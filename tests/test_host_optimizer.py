"""HostStateAdamW: torch.optim.AdamW's update with the moments in host memory, streamed chunk by chunk."""
from __future__ import annotations

import pytest
import torch

from ds_longctx.memory.host_optimizer import STAGING_SLOTS, HostStateAdamW

CHUNK = 64
# several chunks and a tail, more chunks than staging slots, one chunk and a tail, less than one chunk
SHAPES = [(7, 61), (3 * CHUNK,), (CHUNK + 5,), (13,), (11, 3)]
HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _grads(step: int, params, skip=(3,)):
    """Gradients of ``step`` (random, of varying scale); the parameters at ``skip`` get none."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 + step)


def _train(opt, params, steps, first=0):
    for step in range(first, first + steps):
        _grads(step, params)
        opt.step()


def test_host_state_adamw_gives_torch_adamws_float64_parameters_and_states_over_chunks_and_tails():
    assert sum(p.numel() for p in _params()) > STAGING_SLOTS * CHUNK
    ours, theirs = _params(), _params()
    host = HostStateAdamW(ours, chunk_numel=CHUNK, **HYPER)
    reference = torch.optim.AdamW(theirs, **HYPER)
    _train(host, ours, 5)
    _train(reference, theirs, 5)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if i == 3:  # never had a gradient: untouched, no state (weight decay skips it too)
            assert torch.equal(a, _params()[3]) and not host.state[a]
            continue
        assert not torch.equal(a, _params()[i])
        assert torch.equal(a, b), f"param {i}: max diff {(a - b).abs().max():.3e}"
        for name in ("exp_avg", "exp_avg_sq"):
            assert host.state[a][name].device.type == "cpu" and host.state[a][name].shape == a.shape
            assert torch.equal(host.state[a][name], reference.state[b][name]), (i, name)
        assert host.state[a]["step"].item() == reference.state[b]["step"].item() == 5


def test_the_fused_kernel_path_gives_torch_fused_adamws_parameters():
    # the kernel the CUDA path calls, here on the CPU, chunk by chunk: as AdamW(fused=True) over whole tensors
    ours, theirs = _params(torch.float32), _params(torch.float32)
    host = HostStateAdamW(ours, chunk_numel=CHUNK, fused=True, **HYPER)
    reference = torch.optim.AdamW(theirs, fused=True, **HYPER)
    _train(host, ours, 4)
    _train(reference, theirs, 4)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b), f"max diff {(a - b).abs().max():.3e}"


def test_a_state_dict_resumes_training_as_if_uninterrupted():
    params, resumed_params = _params(), _params()
    opt = HostStateAdamW(params, chunk_numel=CHUNK, **HYPER)
    _train(opt, params, 3)
    saved = opt.state_dict()
    assert all(s["exp_avg"].device.type == "cpu" for s in saved["state"].values())
    saved = {"state": {k: {n: t.clone() for n, t in s.items()} for k, s in saved["state"].items()},
             "param_groups": saved["param_groups"]}
    with torch.no_grad():
        for a, b in zip(resumed_params, params):
            a.copy_(b)
    resumed = HostStateAdamW(resumed_params, chunk_numel=CHUNK, **{**HYPER, "lr": 1.0})
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == HYPER["lr"]
    _train(opt, params, 2, first=3)
    _train(resumed, resumed_params, 2, first=3)
    for a, b in zip(resumed_params, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [({"amsgrad": True}, "amsgrad"), ({"maximize": True}, "maximize"),
                                          ({"chunk_numel": 0}, "chunk_numel")])
def test_what_host_state_adamw_cannot_do_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HostStateAdamW(_params(), **kwargs)
