"""Local kernels: each returns the exact out and lse, and its backward with the *final* out/lse of a merged
attention gives block gradients that sum to the exact gradient (what the ring schedules rely on)."""
from __future__ import annotations

import pytest
import torch

from ds_longctx.attention.merge import merge_
from ds_longctx.kernels import KERNELS, KernelError, get_kernel
from ds_longctx.kernels.base import MappedKVKernel
from tests.dist_cases import naive_attention, rel


def _inputs(S=48, H=6, Hkv=2, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, S, h, D, generator=g, dtype=dtype) for h in (H, Hkv, Hkv, H)]


def _reference(q, k, v, do, causal, scale):
    ins = [t.double().clone().requires_grad_() for t in (q, k, v)]
    out = naive_attention(*ins, causal, scale)
    out.backward(do.double())
    s = torch.einsum("bqhd,bkhd->bhqk", ins[0].detach(), ins[1].detach().repeat_interleave(
        q.shape[2] // k.shape[2], 2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu(1), float("-inf"))
    return out.detach(), torch.logsumexp(s, -1), [t.grad for t in ins]


CPU_KERNELS = [n for n, k in KERNELS.items() if k.available() and k.supports(*_inputs(dtype=torch.float32)[:2]) is None]


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_kernel_out_lse_and_grads_match_textbook_attention(name, causal, dtype):
    q, k, v, do = _inputs(dtype=dtype)
    scale = 0.21
    kern = KERNELS[name]
    out, lse = kern.forward(q, k, v, causal, scale)
    dq, dk, dv = kern.backward(do, q, k, v, out, lse, causal, scale)
    r_out, r_lse, r_grads = _reference(q, k, v, do, causal, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for what, a, b in [("out", out, r_out), ("lse", lse, r_lse), ("dq", dq, r_grads[0]), ("dk", dk, r_grads[1]),
                       ("dv", dv, r_grads[2])]:
        assert a.shape == b.shape, what
        assert rel(a, b) < tol, (what, rel(a, b))


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_blocks_merged_by_lse_and_differentiated_with_final_lse_are_exact(name):
    q, k, v, do = _inputs(dtype=torch.float32, seed=3)
    kern, scale, h = KERNELS[name], 0.3, 16
    out, lse = kern.forward(q, k[:, :h], v[:, :h], False, scale)
    out, lse = out.float(), lse.float().clone()
    for a, b in [(h, 32), (32, 48)]:
        o2, l2 = kern.forward(q, k[:, a:b], v[:, a:b], False, scale)
        merge_(out, lse, o2, l2)
    grads = [kern.backward(do, q, k[:, a:b], v[:, a:b], out, lse, False, scale) for a, b in [(0, h), (h, 32), (32, 48)]]
    r_out, r_lse, r_grads = _reference(q, k, v, do, False, scale)
    assert rel(out, r_out) < 1e-5 and rel(lse, r_lse) < 1e-5
    assert rel(sum(g[0] for g in grads), r_grads[0]) < 1e-5
    assert rel(torch.cat([g[1] for g in grads], 1), r_grads[1]) < 1e-5
    assert rel(torch.cat([g[2] for g in grads], 1), r_grads[2]) < 1e-5


def test_mapped_kv_kernel_reads_the_mapped_heads():
    q, k, v, do = _inputs(H=5, Hkv=3, dtype=torch.float64, seed=5)
    index = torch.tensor([0, 0, 1, 2, 2])  # uneven groups, as after an uneven Ulysses split
    kern = MappedKVKernel(KERNELS["reference"], index)
    out, lse = kern.forward(q, k, v, True, 0.25)
    dq, dk, dv = kern.backward(do, q, k, v, out, lse, True, 0.25)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    r = naive_attention(ins[0], ins[1].index_select(2, index), ins[2].index_select(2, index), True, 0.25)
    r.backward(do)
    assert rel(out, r) < 1e-10
    for a, b in zip((dq, dk, dv), ins):
        assert rel(a, b.grad) < 1e-10


def test_auto_picks_a_cpu_kernel_and_unknown_names_are_rejected():
    q, k, _, _ = _inputs(dtype=torch.float32)
    assert get_kernel("auto", q, k).name in ("sdpa_cpu_flash", "reference")
    with pytest.raises(KernelError, match="unknown kernel"):
        get_kernel("fastest", q, k)
