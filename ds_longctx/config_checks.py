"""Checks of a ``long_context`` block: of its values together, and against the run (the DeepSpeed config, the
world size, the model, the sequence length).

They read only values every rank shares, so they fail on every rank alike and before any collective; each
error names the field and what to change.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .config_errors import BLOCK_KEY, LongContextConfigError
from .model_facts import model_head_counts, model_layer_count


class ConfigChecks:
    """The checks of :class:`ds_longctx.config.LongContextConfig` (a mixin: it reads the block's fields)."""

    def _check_self(self) -> None:
        if self.fused_norms and not self.lean_rms_norm:
            raise LongContextConfigError(
                f"{BLOCK_KEY}.fused_norms: fuses the lean norms' tiles; set {BLOCK_KEY}.lean_rms_norm true or "
                f"fused_norms false")
        C = self.fpdt.chunk_size
        if isinstance(C, int) and C % self.ulysses_degree != 0:
            raise LongContextConfigError(
                f"{BLOCK_KEY}.fpdt.chunk_size: {C} is not a multiple of ulysses_degree {self.ulysses_degree} "
                f"(every chunk is split evenly over the Ulysses ranks); use e.g. "
                f"{-(-C // self.ulysses_degree) * self.ulysses_degree}")
        if self.fpdt.offload is True and self.fpdt.chunk_size is None:
            raise LongContextConfigError(
                f"{BLOCK_KEY}.fpdt.offload: offload=true needs {BLOCK_KEY}.fpdt.chunk_size (offload moves the "
                f"K/V of chunks not in use to host memory); set a chunk_size such as 8192 or offload=false")
        if self.keep_attention_output == "reruns" and self.checkpoint_every == 1:
            raise LongContextConfigError(
                f"{BLOCK_KEY}.keep_attention_output: reruns keeps the outputs of the layers that rebuild the next "
                f"layer's input, and with {BLOCK_KEY}.checkpoint_every 1 no layer does; set checkpoint_every to 2 or "
                f"more (or auto), or keep_attention_output true (every output) or false (none)")
        N, M = self.checkpoint_layers, self.checkpoint_offload
        if isinstance(N, int) and isinstance(M, int) and not isinstance(M, bool) and M > N:
            raise LongContextConfigError(
                f"{BLOCK_KEY}.checkpoint_offload: {M} offloaded layers exceed {BLOCK_KEY}.checkpoint_layers {N} (only "
                f"checkpointed layers have a checkpoint to offload); set checkpoint_offload to at most {N} (true: "
                f"every checkpointed layer) or raise checkpoint_layers")

    def check_ds_config(self, ds: Mapping[str, Any]) -> None:
        """Reject DeepSpeed keys that would build a second, conflicting sequence-parallel layout."""
        if self.sp_degree == 1:
            return
        for key in ("sequence_parallel_size", "data_parallel_size"):
            if key in ds:
                raise LongContextConfigError(
                    f"{key}: DeepSpeed's own {key} conflicts with {BLOCK_KEY} (ulysses_degree x ring_degree = "
                    f"{self.sp_degree}); remove {key} from the DeepSpeed config, ds_longctx builds the groups")

    def check_world(self, world_size: int) -> None:
        """The world must be ``dp`` whole sequence-parallel groups."""
        sp = self.sp_degree
        if world_size % sp != 0:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise LongContextConfigError(
                f"{BLOCK_KEY}: ulysses_degree x ring_degree = {self.ulysses_degree} x {self.ring_degree} = {sp} "
                f"does not divide the world size {world_size}; choose degrees whose product is one of "
                f"{divisors} (the quotient is the data-parallel degree)")

    def check_heads(self, num_heads: int, num_kv_heads: Optional[int] = None) -> None:
        """Ulysses scatters query heads, so it needs at least ``ulysses_degree`` of them."""
        if num_kv_heads is None:
            num_kv_heads = num_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise LongContextConfigError(
                f"model: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        if num_heads < self.ulysses_degree:
            raise LongContextConfigError(
                f"{BLOCK_KEY}.ulysses_degree: {self.ulysses_degree} exceeds the model's {num_heads} query heads; "
                f"set ulysses_degree to at most {num_heads} and raise ring_degree instead (the ring is not "
                f"limited by heads)")

    def check_seq_len(self, seq_len: int, what: str = "sequence length") -> None:
        """The zigzag layout splits the sequence into ``2 * ring`` chunks of ``ulysses`` pieces (and, with
        FPDT, each ring position's ``seq_len / ring`` tokens into chunks of ``fpdt.chunk_size``)."""
        m = self.seq_multiple
        if seq_len % m != 0:
            up = -(-seq_len // m) * m
            chunks = (f", fpdt.chunk_size={self.fpdt.chunk_size}: whole chunks per ring position"
                      if isinstance(self.fpdt.chunk_size, int) else "")
            raise LongContextConfigError(
                f"{what} {seq_len} is not divisible by {m}, which {BLOCK_KEY} (ulysses_degree="
                f"{self.ulysses_degree}, ring_degree={self.ring_degree}{chunks}) needs; pad or truncate "
                f"sequences to a multiple of {m} (e.g. {up}) or change the degrees")

    def check_layers(self, layers: int) -> None:
        """``checkpoint_layers`` must not exceed the model's decoder layers."""
        N = self.checkpoint_layers
        if isinstance(N, int) and N > layers:
            raise LongContextConfigError(
                f"{BLOCK_KEY}.checkpoint_layers: {N} exceeds the model's {layers} decoder layers; set it to at most "
                f"{layers} (or null: every layer checkpointed)")

    def check_model(self, model: Any) -> None:
        """Check the head and layer counts of a Hugging Face model (no-op for models without a transformers config)."""
        heads = model_head_counts(model)
        if heads is not None:
            self.check_heads(*heads)
        layers = model_layer_count(model)
        if layers is not None:
            self.check_layers(layers)
