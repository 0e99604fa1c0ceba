"""Measured rates per GPU kind: what one step's FLOPs and bytes cost in time.

The numbers are this project's measurements on Hopper (``../shared/CEILINGS.md``, ``bench/results/``):
H100 and H200 share the compute die, so they share compute rates; they differ in memory only. The matmul
rate is the one training reaches on transformer-sized products (below the 767 TFLOP/s of an 8192^3
product); attention rates are causal fwd+bwd of the kernels at 32K-256K tokens.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rates:
    matmul_flops: float            # bf16 products of a training step's shapes, FLOP/s
    attention_flops: dict          # kernel name -> causal fwd+bwd FLOP/s
    pcie_bytes: float              # pinned host <-> device, one direction, B/s
    nvlink_all_to_all_bytes: float  # bus bandwidth per GPU, B/s
    nvlink_p2p_bytes: float        # ring send per GPU, B/s
    internode_bytes: float         # per GPU across nodes, B/s
    device_copy_bytes: float       # read + write, B/s
    host_adam_params: float        # parameters per second of the CPU optimizer step (torch AdamW)
    moment_stream_bytes: float     # HostStateAdamW's step: moment bytes per second each way, update included


HOPPER = Rates(matmul_flops=680e12,
               attention_flops={"flash_attn4": 612e12, "sdpa_cudnn": 530e12, "flash_attn": 330e12,
                                "sdpa_flash": 330e12, "reference": 100e12},
               pcie_bytes=54e9, nvlink_all_to_all_bytes=259e9, nvlink_p2p_bytes=306e9, internode_bytes=45e9,
               device_copy_bytes=4.0e12, host_adam_params=0.5e9,
               # bench/check_host_optimizer.py on an H200: 106M elements in 24.3 ms, both directions at once
               moment_stream_bytes=34.9e9)


def rates_for(gpu_name: str) -> Rates:
    """Rates of a GPU kind by its pynvml name; other kinds are planned with Hopper's (say so in the plan)."""
    return HOPPER


def resolve_kernel(kernel: str, gpu_name: str) -> str:
    """The kernel ``auto`` picks on this GPU kind (FlashAttention-4 on Hopper, else cuDNN SDPA)."""
    if kernel != "auto":
        return kernel
    return "flash_attn4" if any(k in gpu_name for k in ("H100", "H200", "H800", "GH200")) else "sdpa_cudnn"


__all__ = ["HOPPER", "Rates", "rates_for", "resolve_kernel"]
