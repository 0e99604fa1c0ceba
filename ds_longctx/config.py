"""The ``"long_context"`` block of a DeepSpeed config and its validation.

DeepSpeed ignores top-level keys it does not know, so a typo in this block would otherwise go unnoticed;
:class:`LongContextConfig` rejects unknown keys and names the offending field in every error.

Example block (inside ``ds_config.json``)::

    "long_context": {
        "ulysses_degree": 4,
        "ring_degree": 2,
        "fpdt": {"chunk_size": 8192, "offload": true},
        "kernel": "auto"
    }

Checks that need more than the block (world size, model head counts, sequence length) are methods of the
config; they read only values every rank shares, so they fail on every rank alike and before any collective.
That every rank holds the same block is checked at initialization
(:func:`ds_longctx.integration.agree.agree_on_block`).
"""
from __future__ import annotations

from typing import Annotated, Any, Dict, Iterable, List, Literal, Mapping, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from .config_checks import ConfigChecks
from .config_errors import BLOCK_KEY, LongContextConfigError, format_validation_error
from .config_source import ConfigSource, load_ds_config
from .model_facts import model_head_counts, model_layer_count

#: Local attention kernels accepted by ``kernel`` (``ds_longctx.kernels.kernel_names()``).
KERNEL_NAMES = ("auto", "reference", "sdpa_cudnn", "sdpa_flash", "sdpa_cpu_flash", "flash_attn", "flash_attn4")

KernelName = Literal[KERNEL_NAMES]

#: A value the planner chooses (:mod:`ds_longctx.plan`) when :func:`ds_longctx.initialize` resolves the block.
AUTO = "auto"
Auto = Literal["auto"]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
LayerCount = Annotated[StrictInt, Field(ge=0)]


class FPDTConfig(BaseModel):
    """FPDT (fully pipelined distributed transformer) chunking of the attention of each rank."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_size: Union[Auto, PositiveInt, None] = Field(
        default=None,
        description="Tokens per chunk of the sequence a rank attends over after the Ulysses all-to-all; "
                    "attention runs chunk by chunk so only one chunk's scores and K/V are live. "
                    "null: no chunking (fastest when memory allows). auto: chosen by the planner.")
    offload: Union[Auto, StrictBool] = Field(
        default=False,
        description="Keep the K/V chunks and the q/out/lse saved for backward in pinned host memory, copied on "
                    "side streams behind the kernels (needs chunk_size). The attention's GPU state then stays "
                    "a few chunks whatever the sequence length. auto: chosen by the planner.")


class LongContextConfig(ConfigChecks, BaseModel):
    """The ``"long_context"`` block of a DeepSpeed config: hybrid Ulysses x ring sequence parallelism.

    The world is split into ``dp = world_size / (ulysses_degree * ring_degree)`` data-parallel replicas of a
    sequence-parallel group of ``ulysses_degree * ring_degree`` ranks that share one sequence.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ulysses_degree: int = Field(
        default=1, strict=True, gt=0,
        description="Ranks of each Ulysses group (all-to-all that scatters attention heads). Keep it within a "
                    "node (NVLink) and at most the model's query-head count.")
    ring_degree: int = Field(
        default=1, strict=True, gt=0,
        description="Ranks of each ring (K/V passed around, overlapped with compute). Not limited by heads; "
                    "use it to span nodes.")
    fpdt: FPDTConfig = Field(
        default_factory=FPDTConfig,
        description="FPDT chunking and host offload of the attention inputs.")
    kernel: KernelName = Field(
        default="auto",
        description="Local attention kernel. auto picks the fastest available for the device and dtype "
                    "(flash_attn4 > sdpa_cudnn > flash_attn > sdpa_flash on CUDA, sdpa_cpu_flash on CPU); "
                    "reference is the plain PyTorch kernel used to check the others.")
    causal: bool = Field(
        default=True, strict=True,
        description="Causal mask over global token positions (decoder LMs). Hugging Face attention modules "
                    "use their own is_causal; this applies to direct calls through the engine's long_context.")
    keep_attention_output: Union[Auto, StrictBool, Literal["reruns"]] = Field(
        default=True,
        description="With activation checkpointing on (model.gradient_checkpointing_enable() for Hugging Face "
                    "models, ds_longctx.memory.remat.checkpoint otherwise), keep each layer's attention output "
                    "and log-sum-exp instead of running the attention again in backward (DistFlashAttn's "
                    "rematerialization-aware checkpointing): one attention forward less per layer and step, "
                    "for one more [S_local, hidden] activation per layer (in pinned host memory with "
                    "fpdt.offload or checkpoint_offload). reruns (with checkpoint_every N > 1, Hugging Face "
                    "models): only the outputs that rebuilding inputs reruns, those of every checkpointed layer "
                    "but the last of each group of N, in the memory of the inputs the groups no longer keep; "
                    "the last layer of a group runs its attention again in its backward. auto: chosen by the "
                    "planner.")
    lean_rms_norm: bool = Field(
        default=True, strict=True,
        description="Hugging Face models (Llama, Qwen2, Qwen3, Mistral): RMSNorm layers keep only their input and "
                    "1/rms for backward, computing over row tiles, instead of an fp32 copy of the input and the "
                    "normalized tensor (three [S_local, hidden] activations less per norm in bf16). The forward "
                    "gives the same values; the gradient differs by rounding only. false: the models' own norms.")
    fused_norms: bool = Field(
        default=False, strict=True,
        description="With lean_rms_norm: each norm tile's forward runs as one compiled kernel and its backward as "
                    "two (torch.compile), reading the input once instead of about nine fp32 passes; the first "
                    "step compiles them. Values may differ from the eager norms by one bf16 rounding step.")
    fused_gated_mlp: bool = Field(
        default=False, strict=True,
        description="Hugging Face models with a SiLU-gated MLP (Llama, Qwen2, Qwen3, Mistral): silu(gate) * up and its "
                    "backward run as compiled kernels (torch.compile), one read of gate and up instead of about five "
                    "passes forward and eight backward, and the MLP keeps gate and up for backward but not their "
                    "product's factor silu(gate) (one [S_local, intermediate] activation less); the first step "
                    "compiles them. Values may differ from the eager MLP's by one bf16 rounding step.")
    fused_rope: bool = Field(
        default=False, strict=True,
        description="Hugging Face models (Llama, Qwen2, Qwen3, Mistral): the rotary position embedding of queries "
                    "and keys and its backward run as compiled kernels (torch.compile), one pass over each tensor "
                    "instead of five; the first step compiles them. Values may differ from the models' own by one "
                    "bf16 rounding step. Other models in the process keep theirs.")
    checkpoint_offload: Union[Auto, StrictBool, LayerCount] = Field(
        default=False,
        description="With activation checkpointing on, keep each checkpointed layer's input (one [S_local, "
                    "hidden] activation per layer) and its kept attention output in pinned host memory from "
                    "forward to backward, copied on side streams and prefetched one layer ahead: the GPU holds "
                    "no per-layer activations across the step, whatever the depth. Costs host memory of about "
                    "2 x layers x S_local x hidden x dtype bytes. A number N offloads the first N checkpointed "
                    "layers only (host memory rarely holds every layer of a deep model at long sequences); "
                    "auto: chosen by the planner.")
    checkpoint_layers: Union[Auto, LayerCount, None] = Field(
        default=None,
        description="With activation checkpointing on, checkpoint only the first N decoder layers; the last "
                    "layers - N run without checkpointing and keep their full activations for backward, so they "
                    "are not recomputed (the last ones: backward reaches them first and frees their memory before "
                    "the checkpointed layers recompute). Kept attention outputs and checkpoint_offload apply to the "
                    "checkpointed layers only. null: every layer as the model's gradient checkpointing says; auto: "
                    "chosen by the planner (as many unchecked layers as the GPU holds, when that is faster).")
    checkpoint_every: Union[Auto, PositiveInt] = Field(
        default=1,
        description="With activation checkpointing on: keep the input of every N-th checkpointed layer only; each "
                    "layer in between rebuilds its input in backward by running the layer before it forward once "
                    "more (without grad, from that layer's kept or itself rebuilt input). N times fewer kept "
                    "inputs (one [S_local, hidden] activation per layer, on the GPU or with checkpoint_offload in "
                    "host memory: what limits a deep model's longest sequence) for (N - 1) / 2 extra layer "
                    "forwards per layer (without their attention where keep_attention_output holds its output). "
                    "Applies to consecutive checkpointed layers called with their hidden "
                    "states as their one positional argument (transformers' decoder layers). 1: every layer keeps "
                    "its input; auto: chosen by the planner (1 unless only a larger N fits, or is faster with the "
                    "attention outputs kept).")
    mlp_tile_tokens: Union[Auto, PositiveInt, None] = Field(
        default=None,
        description="Hugging Face models: run each decoder layer's MLP over tiles of this many local tokens, "
                    "recomputing a tile's activations in backward, so its [S_local, intermediate] activations "
                    "never exist whole (one more MLP forward per step). null: off. Try 16384 for sequences "
                    "of 256K+ tokens per rank; auto: chosen by the planner.")
    loss_tile_tokens: Union[Auto, PositiveInt, None] = Field(
        default=None,
        description="Hugging Face models called with shift_labels=...: compute the loss from the final hidden "
                    "states over tiles of this many local tokens (one tile's logits at a time, recomputed in "
                    "backward) and return no logits. null: the loss comes from the model's full logits. Try "
                    "4096 with a large vocabulary; auto: chosen by the planner.")
    host_optimizer_states: StrictBool = Field(
        default=False,
        description="Keep AdamW's two moments (exp_avg and exp_avg_sq, 8 bytes per parameter of the rank's ZeRO "
                    "partition) in pinned host memory instead of on the GPU; the update still runs on the GPU, "
                    "chunk by chunk as the moments stream in and out on side streams "
                    "(ds_longctx.memory.HostStateAdamW, built from the DeepSpeed config's AdamW or Adam optimizer "
                    "block; the fp32 master weights stay on the GPU). Frees 8 bytes per parameter of GPU memory; "
                    "costs as much page-locked host memory and 8 bytes per parameter each way over PCIe per step. "
                    "Not with zero_optimization.offload_optimizer (the whole optimizer on the CPU) nor with an "
                    "optimizer object passed to initialize.")
    timeout_s: Optional[float] = Field(
        default=None, strict=True, gt=0,
        description="Seconds a collective may wait for another rank before every rank stops with an error naming "
                    "the rank that raised, died or hangs and what it was doing (passed to the creation of the "
                    "process groups). null: PyTorch's default (30 minutes for gloo, 10 for NCCL).")
    load_balance: Literal["zigzag"] = Field(
        default="zigzag",
        description="Token layout across the ring. zigzag: ring position r holds chunks r and 2R-1-r of the "
                    "sequence so that causal work is equal on every rank.")
    seq_len: Optional[PositiveInt] = Field(
        default=None,
        description="Global tokens per sequence of the run, for the planner: ds_longctx.initialize resolves the "
                    "\"auto\" values and runs the pre-flight memory check for it. null: the training_data's first "
                    "sample's length, else (with \"auto\" values) the first batch through "
                    "engine.long_context.shard_batch, of one length on every rank, resolves and checks them. A "
                    "later batch longer than the length planned for is checked again.")
    preflight: StrictBool = Field(
        default=True,
        description="Before the first step, predict the step's GPU peak and pinned host memory (ds_longctx.plan) "
                    "and raise on every rank when they exceed the machine, naming the largest parts and a "
                    "configuration that fits. false: no check.")

    # ---- derived -----------------------------------------------------------------------------------------

    @property
    def sp_degree(self) -> int:
        """Sequence-parallel group size ``ulysses_degree * ring_degree``."""
        return self.ulysses_degree * self.ring_degree

    @property
    def seq_multiple(self) -> int:
        """Global sequence lengths must be a multiple of this (see :class:`ds_longctx.layout.ZigzagLayout`;
        with FPDT chunking each ring position's ``S / ring`` tokens must also hold whole chunks)."""
        import math

        from .layout import ZigzagLayout
        m = ZigzagLayout(self.ring_degree, self.ulysses_degree).multiple
        if self.fpdt.chunk_size not in (None, AUTO):
            m = math.lcm(m, self.ring_degree * self.fpdt.chunk_size)
        return m

    def attention_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`ds_longctx.attention.attention` that this block sets."""
        self.require_resolved()
        return {"kernel": self.kernel, "chunk_size": self.fpdt.chunk_size, "offload": self.fpdt.offload}

    @property
    def auto_fields(self) -> List[str]:
        """Dotted names of the fields still ``"auto"``."""
        fields = [f"fpdt.{k}" for k, v in self.fpdt.model_dump().items() if v == AUTO]
        # kernel "auto" is not the planner's: the kernel is picked on the device at run time
        return fields + [k for k, v in self.model_dump(exclude={"fpdt", "kernel"}).items() if v == AUTO]

    def require_resolved(self) -> None:
        """Raise when a value is still ``"auto"``: only :func:`ds_longctx.initialize` (from ``seq_len``), the
        engine's first ``shard_batch`` (from the batch's length) or the planner resolves it."""
        if self.auto_fields:
            raise LongContextConfigError(
                f"{BLOCK_KEY}: {', '.join(self.auto_fields)} still \"auto\"; ds_longctx.initialize resolves auto "
                f"values from the model, the world and {BLOCK_KEY}.seq_len, or, without it, "
                f"engine.long_context.shard_batch(batch) resolves them from the first batch's global sequence "
                f"length: pass batches through shard_batch before the model, or set {BLOCK_KEY}.seq_len; with the "
                f"functional API give them explicitly (ds-longctx plan suggests values)")

    def resolve(self, values: Mapping[str, Any]) -> "LongContextConfig":
        """This block with the ``"auto"`` fields set from ``values`` (dotted names, e.g. ``"fpdt.chunk_size"``);
        the result is validated like a user's block."""
        block = self.model_dump(mode="json")
        for name in self.auto_fields:
            if name not in values:
                raise LongContextConfigError(f"{BLOCK_KEY}.{name}: no value to resolve \"auto\" with")
            where, key = (block["fpdt"], name.split(".", 1)[1]) if name.startswith("fpdt.") else (block, name)
            where[key] = values[name]
        return LongContextConfig.from_block(block)

    # ---- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_block(cls, block: Optional[Mapping[str, Any]]) -> "LongContextConfig":
        """Validate a ``long_context`` block (``None``: all defaults, i.e. no sequence parallelism)."""
        if block is None:
            block = {}
        if not isinstance(block, Mapping):
            raise LongContextConfigError(
                f"{BLOCK_KEY}: must be an object (a JSON dict), got {type(block).__name__} {block!r}")
        try:
            cfg = cls.model_validate(dict(block))
        except ValidationError as exc:
            raise LongContextConfigError(format_validation_error(exc, cls)) from None
        cfg._check_self()
        return cfg

    @classmethod
    def from_ds_config(cls, config: ConfigSource) -> "LongContextConfig":
        """Read and validate the block of a full DeepSpeed config (dict, path to a json/hjson file, or base64).

        A config without the block yields the defaults (``ulysses_degree = ring_degree = 1``).
        """
        ds = load_ds_config(config)
        return cls.from_block(ds.get(BLOCK_KEY))


def from_ds_config(config: ConfigSource) -> LongContextConfig:
    """The validated ``long_context`` block of a DeepSpeed config (dict, json/hjson path or base64 string)."""
    return LongContextConfig.from_ds_config(config)


def resolved_block(cfg: LongContextConfig) -> Dict[str, Any]:
    """The block with every default filled in, as it would appear in a DeepSpeed config."""
    return cfg.model_dump(mode="json")


def describe_fields(model: type = LongContextConfig, prefix: str = "") -> Iterable[Tuple[str, Any, str]]:
    """``(dotted name, default, description)`` of every field, nested models expanded (for docs/CLI)."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from describe_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field.get_default(call_default_factory=True), field.description or ""


__all__ = ["AUTO", "BLOCK_KEY", "KERNEL_NAMES", "FPDTConfig", "LongContextConfig", "LongContextConfigError",
           "describe_fields", "from_ds_config", "load_ds_config", "model_head_counts", "model_layer_count",
           "resolved_block"]
