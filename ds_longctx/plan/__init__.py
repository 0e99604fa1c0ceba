"""Plan a model onto a machine: predict one training step's GPU peak, pinned host memory and time
(:mod:`.estimate`), search the fastest configuration that fits and the longest sequence (:mod:`.search`),
resolve ``"auto"`` values of the block and check a run before its first step (:mod:`.preflight`).

Sits beside the config: it reads the block, the model's config and the machine, and imports nothing that
runs a collective.
"""
from .estimate import Estimate, estimate
from .machine import GIB, Machine, MachineError, detect
from .model_spec import ModelSpec, ModelSpecError
from .rates import Rates, rates_for
from .settings import Run, Settings, ZeroSettings

__all__ = ["Estimate", "GIB", "Machine", "MachineError", "ModelSpec", "ModelSpecError", "Rates", "Run", "Settings",
           "ZeroSettings", "detect", "estimate", "rates_for"]
