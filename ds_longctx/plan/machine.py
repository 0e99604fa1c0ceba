"""What the machine offers a run: GPUs (count, kind, memory) and the host memory the process may use.

Facts come from the machine (pynvml for GPUs; the cgroup limit or ``MemAvailable`` for host memory) and
every one can be given instead, so a plan can be made on a CPU machine for GPUs one does not have.
``MemTotal`` is never read: on some GPU machines it starts small and grows as memory is touched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

GIB = 1 << 30


class MachineError(ValueError):
    """A fact the planner needs could not be read; the message names the flag that gives it."""


@dataclass(frozen=True)
class Machine:
    """``gpus`` GPUs of ``gpu_memory`` bytes each, ``gpus_per_node`` of them per host, ``host_memory`` bytes
    of host memory per node that the processes may still take; ``gpu_name`` picks the measured rates."""

    gpus: int
    gpu_memory: int
    host_memory: int
    gpu_name: str = "NVIDIA H200"
    gpus_per_node: Optional[int] = None

    @property
    def per_node(self) -> int:
        return self.gpus_per_node or min(self.gpus, 8)

    @property
    def host_memory_per_gpu(self) -> int:
        return self.host_memory // self.per_node


def _nvml():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - no driver, no library, no GPU: the flags must say it
        return None


def gpu_facts():
    """``(count, name of GPU 0, total bytes of GPU 0)`` from pynvml, or None without a GPU driver."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        return count, name, int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    finally:
        nvml.nvmlShutdown()


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_available_bytes(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes the process's cgroup may still take (limit minus usage), None where no limit is set."""
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        limit = _read_int(os.path.join(root, limit_file))
        if limit is None or limit >= 1 << 60:  # "max", or v1's "unlimited" page-counter value
            continue
        usage = _read_int(os.path.join(root, usage_file)) or 0
        return max(0, limit - usage)
    return None


def meminfo_available_bytes(path: str = "/proc/meminfo") -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_available_bytes() -> Optional[int]:
    """The host memory this process may still use: the tighter of its cgroup's room and ``MemAvailable``."""
    found = [b for b in (cgroup_available_bytes(), meminfo_available_bytes()) if b is not None]
    return min(found) if found else None


#: Machine facts for ds_longctx.initialize's plan, as JSON ({"gpu_memory_gib": 80, "host_memory_gib": 500,
#: "gpu_name": "NVIDIA H100"}): where the machine misreports them, or to plan on CPU processes.
MACHINE_ENV = "DS_LONGCTX_MACHINE"


def facts_from_env() -> Optional[dict]:
    """The facts :data:`MACHINE_ENV` states, or None when it is unset."""
    import json

    text = os.environ.get(MACHINE_ENV)
    if not text:
        return None
    try:
        facts = json.loads(text)
    except ValueError as exc:
        raise MachineError(f"{MACHINE_ENV}: not valid JSON: {exc}") from None
    unknown = set(facts) - {"gpu_memory_gib", "host_memory_gib", "gpu_name", "gpus_per_node"}
    if not isinstance(facts, dict) or unknown:
        raise MachineError(f"{MACHINE_ENV}: a JSON object with gpu_memory_gib, host_memory_gib, gpu_name, "
                           f"gpus_per_node is expected (unknown: {sorted(unknown)})")
    return facts


def detect(gpus: Optional[int] = None, gpu_memory_gib: Optional[float] = None,
           host_memory_gib: Optional[float] = None, gpu_name: Optional[str] = None,
           gpus_per_node: Optional[int] = None) -> Machine:
    """The machine, each fact from the argument when given, else read here.

    Raises :class:`MachineError` naming the flag (``--gpus``, ``--gpu-memory-gib``, ``--host-memory-gib``)
    for a fact that neither the arguments nor this machine give."""
    facts = gpu_facts() if gpus is None or gpu_memory_gib is None or gpu_name is None else None
    if gpus is None:
        if facts is None:
            raise MachineError("no GPU is visible here (pynvml found none): give the GPU count with --gpus N")
        gpus = facts[0]
    if gpu_memory_gib is None:
        if facts is None:
            raise MachineError("no GPU is visible here (pynvml found none): give each GPU's memory with "
                               "--gpu-memory-gib G (e.g. 139.8 for an H200, 79.2 for an H100 80GB)")
        gpu_memory = facts[2]
    else:
        gpu_memory = int(gpu_memory_gib * GIB)
    if host_memory_gib is None:
        host = host_available_bytes()
        if host is None:
            raise MachineError("the host memory available could not be read (no cgroup limit, no /proc/meminfo): "
                               "give it with --host-memory-gib H")
    else:
        host = int(host_memory_gib * GIB)
    name = gpu_name or (facts[1] if facts is not None else "NVIDIA H200")
    if gpus < 1 or gpu_memory <= 0 or host < 0:
        raise MachineError(f"machine facts must be positive: gpus={gpus}, gpu memory {gpu_memory / GIB:.1f} GiB, "
                           f"host memory {host / GIB:.1f} GiB")
    return Machine(gpus=gpus, gpu_memory=gpu_memory, host_memory=host, gpu_name=name, gpus_per_node=gpus_per_node)


__all__ = ["GIB", "MACHINE_ENV", "Machine", "MachineError", "facts_from_env", "cgroup_available_bytes", "detect", "gpu_facts",
           "host_available_bytes", "meminfo_available_bytes"]
