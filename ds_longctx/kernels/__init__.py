"""Local attention kernels behind one interface (see :mod:`.base`), and the choice among them.

``auto`` takes the fastest kernel present for the inputs' device and dtype. On Hopper, measured
fwd/bwd TFLOP/s at 32K causal: FlashAttention-4 632/606, cuDNN 601/534, FA2 345/316 (docs/kernels.md).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .base import Kernel, expand_kv, reduce_kv
from .flash_attn import FlashAttn2Kernel
from .flash_attn4 import FlashAttn4Kernel
from .reference import ReferenceKernel
from .sdpa import CPUFlashKernel, CudnnKernel, FlashKernel

KERNELS: Dict[str, Kernel] = {k.name: k for k in (
    ReferenceKernel(), CPUFlashKernel(), CudnnKernel(), FlashKernel(), FlashAttn2Kernel(), FlashAttn4Kernel())}

# Fastest first, per device type.
AUTO_ORDER = {
    "cuda": ["flash_attn4", "sdpa_cudnn", "flash_attn", "sdpa_flash", "reference"],
    "cpu": ["sdpa_cpu_flash", "reference"],
}


class KernelError(ValueError):
    """A kernel that cannot run these inputs; raised before any collective."""


def kernel_names() -> List[str]:
    return ["auto"] + list(KERNELS)


def get_kernel(name: str, q: torch.Tensor, k: torch.Tensor) -> Kernel:
    """The kernel called ``name`` (or the fastest usable one for ``auto``) for inputs like ``q``, ``k``.

    Raises :class:`KernelError` naming the reason when the requested kernel cannot run them.
    """
    if isinstance(name, Kernel):
        return name
    if name == "auto":
        for cand in AUTO_ORDER.get(q.device.type, ["reference"]):
            kern = KERNELS[cand]
            if kern.available() and kern.supports(q, k) is None:
                return kern
        return KERNELS["reference"]
    if name not in KERNELS:
        raise KernelError(f"unknown kernel {name!r}; choose one of {kernel_names()}")
    kern = KERNELS[name]
    if not kern.available():
        raise KernelError(f"kernel {name!r} is not available here (library not installed or no device); "
                          f"use kernel='auto'")
    why = kern.supports(q, k)
    if why is not None:
        raise KernelError(f"kernel {name!r} cannot run these inputs: {why}")
    return kern


__all__ = ["Kernel", "KERNELS", "KernelError", "get_kernel", "kernel_names", "expand_kv", "reduce_kv"]
