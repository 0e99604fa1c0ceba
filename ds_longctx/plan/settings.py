"""What a plan chooses (:class:`Settings`) and what it is chosen for (:class:`Run`), and their translation to
and from a DeepSpeed config with its ``long_context`` block."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional

from ..checkpoint_pattern import KeepAttentionOutput
from .model_spec import ModelSpec

#: DeepSpeed's ZeRO-3 defaults (deepspeed.runtime.zero.config), in elements.
ZERO_REDUCE_BUCKET = 500_000_000
ZERO_PREFETCH_BUCKET = 50_000_000
ZERO_PERSISTENCE_THRESHOLD = 100_000
ZERO_SUB_GROUP_SIZE = 1_000_000_000
#: bytes of a gradient-accumulation element per ``data_types.grad_accum_dtype`` (unset: the model's, bf16)
GRAD_ACCUM_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO-3 knobs that move memory: optimizer offload (its pinning, sub-groups and gradient dtype) and the
    communication buckets."""

    optimizer_offload: bool = False
    reduce_bucket: int = ZERO_REDUCE_BUCKET
    prefetch_bucket: int = ZERO_PREFETCH_BUCKET
    persistence_threshold: int = ZERO_PERSISTENCE_THRESHOLD
    sub_group_size: int = ZERO_SUB_GROUP_SIZE
    optimizer_pin_memory: bool = True
    grad_accum_bytes: int = 2

    @classmethod
    def from_ds_config(cls, ds: Mapping[str, Any]) -> "ZeroSettings":
        zero = ds.get("zero_optimization") or {}
        offload_block = zero.get("offload_optimizer") or {}
        offload = offload_block.get("device", "none") in ("cpu", "nvme")
        accum = str((ds.get("data_types") or {}).get("grad_accum_dtype") or "bf16").lower()

        def number(key, default):
            value = zero.get(key, default)
            return default if value == "auto" or value is None else int(value)

        return cls(optimizer_offload=offload, reduce_bucket=number("reduce_bucket_size", ZERO_REDUCE_BUCKET),
                   prefetch_bucket=number("stage3_prefetch_bucket_size", ZERO_PREFETCH_BUCKET),
                   persistence_threshold=number("stage3_param_persistence_threshold", ZERO_PERSISTENCE_THRESHOLD),
                   sub_group_size=number("sub_group_size", ZERO_SUB_GROUP_SIZE),
                   optimizer_pin_memory=bool(offload_block.get("pin_memory", True)),  # DeepSpeed's default
                   grad_accum_bytes=GRAD_ACCUM_BYTES.get(accum, 2))


@dataclass(frozen=True)
class Settings:
    """One configuration of the long-context features (``long_context`` block) and of the optimizer's place.

    ``checkpoint_layers``: how many decoder layers (the first ones) are checkpointed under activation
    checkpointing (None: all); the others keep their full activations. ``checkpoint_offload_layers``: how many
    checkpointed layers (the first ones) keep their input and kept attention output in pinned host memory.
    ``checkpoint_every``: only every N-th checkpointed layer keeps its input; the others rebuild it in backward.
    ``host_optimizer_states``: AdamW's moments in pinned host memory, streamed through the GPU for the update
    (never together with ``zero.optimizer_offload``)."""

    ulysses: int = 1
    ring: int = 1
    kernel: str = "auto"
    chunk_size: Optional[int] = None
    fpdt_offload: bool = False
    keep_attention_output: KeepAttentionOutput = True  # or "reruns"
    checkpoint_layers: Optional[int] = None
    checkpoint_offload_layers: int = 0
    checkpoint_every: int = 1
    mlp_tile_tokens: Optional[int] = None
    loss_tile_tokens: Optional[int] = None
    lean_rms_norm: bool = True
    fused_norms: bool = False
    fused_gated_mlp: bool = False
    fused_rope: bool = False
    host_optimizer_states: bool = False
    zero: ZeroSettings = ZeroSettings()

    @classmethod
    def recommended(cls, kernel: str = "auto", **fields) -> "Settings":
        """What ``ds-longctx plan`` starts its search from: the compiled norms, gating and rotary embedding on
        (each faster and none larger than the eager one; measured on an H200 in bench/results/alstcmp_*)."""
        return cls(kernel=kernel, fused_norms=True, fused_gated_mlp=True, fused_rope=True, **fields)

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    def checkpointed(self, layers: int) -> int:
        """How many of ``layers`` decoder layers are checkpointed (under activation checkpointing)."""
        return layers if self.checkpoint_layers is None else min(layers, self.checkpoint_layers)

    def block(self, layers: int, seq_len: Optional[int] = None) -> Dict[str, Any]:
        """The ``long_context`` block of these settings (``checkpoint_offload`` true for every checkpointed layer,
        ``checkpoint_layers`` null for every layer)."""
        offload, checkpointed = self.checkpoint_offload_layers, self.checkpointed(layers)
        block: Dict[str, Any] = {
            "ulysses_degree": self.ulysses, "ring_degree": self.ring, "kernel": self.kernel,
            "fpdt": {"chunk_size": self.chunk_size, "offload": self.fpdt_offload},
            "keep_attention_output": self.keep_attention_output,
            "checkpoint_layers": None if checkpointed >= layers else checkpointed,
            "checkpoint_offload": True if offload and offload >= checkpointed else (offload if offload else False),
            "checkpoint_every": self.checkpoint_every,
            "mlp_tile_tokens": self.mlp_tile_tokens, "loss_tile_tokens": self.loss_tile_tokens,
            "lean_rms_norm": self.lean_rms_norm, "fused_norms": self.fused_norms,
            "fused_gated_mlp": self.fused_gated_mlp, "fused_rope": self.fused_rope,
            "host_optimizer_states": self.host_optimizer_states,
        }
        if seq_len is not None:
            block["seq_len"] = seq_len
        return block

    def ds_config(self, base: Mapping[str, Any], layers: int, seq_len: Optional[int] = None) -> Dict[str, Any]:
        """``base`` (a DeepSpeed config) with this block and optimizer placement written in."""
        ds = copy.deepcopy(dict(base))
        ds["long_context"] = self.block(layers, seq_len)
        zero = ds.setdefault("zero_optimization", {})
        zero.setdefault("stage", 3)
        if self.zero.optimizer_offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        else:
            zero.pop("offload_optimizer", None)
        return ds

    @classmethod
    def from_block(cls, block: Mapping[str, Any], layers: int, zero: ZeroSettings) -> "Settings":
        """From a resolved block (no ``"auto"`` left); ``layers`` turns ``checkpoint_offload: true`` into a count
        (every checkpointed layer)."""
        fpdt = block.get("fpdt") or {}
        offload = block.get("checkpoint_offload", False)
        checkpoint_layers = block.get("checkpoint_layers")
        checkpointed = layers if checkpoint_layers is None else min(layers, checkpoint_layers)
        layers_offloaded = checkpointed if offload is True else int(offload or 0)
        return cls(ulysses=block.get("ulysses_degree", 1), ring=block.get("ring_degree", 1),
                   kernel=block.get("kernel", "auto"), chunk_size=fpdt.get("chunk_size"),
                   fpdt_offload=bool(fpdt.get("offload", False)),
                   keep_attention_output=block.get("keep_attention_output", True),
                   checkpoint_layers=None if checkpointed >= layers else checkpointed,
                   checkpoint_offload_layers=min(checkpointed, layers_offloaded),
                   checkpoint_every=block.get("checkpoint_every", 1),
                   mlp_tile_tokens=block.get("mlp_tile_tokens"), loss_tile_tokens=block.get("loss_tile_tokens"),
                   lean_rms_norm=block.get("lean_rms_norm", True), fused_norms=block.get("fused_norms", False),
                   fused_gated_mlp=block.get("fused_gated_mlp", False), fused_rope=block.get("fused_rope", False),
                   host_optimizer_states=bool(block.get("host_optimizer_states", False)), zero=zero)


@dataclass(frozen=True)
class Run:
    """What the settings are for: a model on ``world`` GPUs, sequences of ``seq_len`` tokens, ``micro_batch``
    sequences per rank and step, activation checkpointing on or off, bf16."""

    model: ModelSpec
    world: int
    seq_len: int
    micro_batch: int = 1
    checkpointing: bool = True

    def with_seq_len(self, seq_len: int) -> "Run":
        return replace(self, seq_len=seq_len)


__all__ = ["Run", "Settings", "ZeroSettings"]
