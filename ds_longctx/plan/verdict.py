"""A configuration judged against a machine: its estimate, the memory kept free, whether it fits and, when
not, what does not fit in words a user can act on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .estimate import Estimate, estimate
from .machine import GIB, Machine
from .rates import rates_for
from .settings import Run, Settings


@dataclass(frozen=True)
class Margins:
    """Memory kept free: allocator fragmentation, NCCL buffers, the prediction's error (about 10%)."""

    gpu: int
    host: int

    @classmethod
    def default(cls, machine: Machine, gpu_gib: Optional[float] = None, host_gib: Optional[float] = None):
        gpu = int(gpu_gib * GIB) if gpu_gib is not None else int(0.10 * machine.gpu_memory)
        host = int(host_gib * GIB) if host_gib is not None else int(0.10 * machine.host_memory)
        return cls(gpu=gpu, host=host)


@dataclass(frozen=True)
class Verdict:
    """One configuration, judged: its estimate and whether (and why not) it fits."""

    run: Run
    settings: Settings
    estimate: Estimate
    gpu_limit: int
    host_limit: int
    ranks_per_node: int

    @property
    def node_host(self) -> int:
        return self.ranks_per_node * (self.estimate.host_pinned + self.estimate.host_other)

    @property
    def fits_gpu(self) -> bool:
        return self.estimate.gpu_peak <= self.gpu_limit

    @property
    def fits_host(self) -> bool:
        return self.node_host <= self.host_limit

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def why_not(self) -> str:
        """What does not fit, with the largest parts, in words a user can act on."""
        e, reasons = self.estimate, []
        if not self.fits_gpu:
            top = sorted(e.gpu_components.items(), key=lambda kv: -kv[1])[:3]
            reasons.append(f"GPU peak {e.gpu_peak / GIB:.1f} GiB > {self.gpu_limit / GIB:.1f} GiB usable "
                           f"(largest: {', '.join(f'{k} {v / GIB:.1f}' for k, v in top)})")
        if not self.fits_host:
            top = sorted(e.host_components.items(), key=lambda kv: -kv[1])[:3]
            reasons.append(f"host memory {self.node_host / GIB:.1f} GiB per node > {self.host_limit / GIB:.1f} GiB "
                           f"usable (pinned per rank: {', '.join(f'{k} {v / GIB:.1f}' for k, v in top)})")
        return "; ".join(reasons)


def judge(run: Run, settings: Settings, machine: Machine, margins: Margins) -> Verdict:
    """``settings`` for ``run`` estimated at ``machine``'s rates and judged against its memory less ``margins``."""
    est = estimate(run, settings, rates_for(machine.gpu_name), machine.gpu_name)
    return Verdict(run=run, settings=settings, estimate=est, gpu_limit=machine.gpu_memory - margins.gpu,
                   host_limit=machine.host_memory - margins.host, ranks_per_node=min(run.world, machine.per_node))
