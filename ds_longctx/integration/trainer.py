"""transformers' ``Trainer`` (and TRL's trainers) with the sequence parallelism of the DeepSpeed config.

:class:`LongContextTrainerMixin` goes before a ``Trainer`` class in the bases: the Trainer then builds its
DeepSpeed engine through :func:`ds_longctx.initialize` (the block of ``TrainingArguments(deepspeed=...)``
read, the model's attention switched, ZeRO over every rank), splits samples over the data-parallel replicas
only (the ranks of a sequence-parallel group read the same batches), shards each batch with
``engine.long_context.shard_batch`` and takes the loss of the whole sequence. The loss a step optimizes,
the loss it logs and the tokens it counts are those of one process training on the step's whole batch:

* a micro-batch's loss is ``group token-loss sum / num_items_in_batch`` (the step's valid targets over all
  replicas and accumulated micro-batches, as the Trainer counts them), times ``dp``: DeepSpeed averages
  gradients over all ``dp x U x R`` ranks and the group loss's adjoint adds ``U x R`` shares
  (:mod:`.loss`), so the applied gradient is the single-process gradient of the step;
* the logged loss is the Trainer's mean over ranks of those values: every group counts ``U x R`` times,
  which the ``dp`` factor turns into the step's loss; tokens and FLOPs seen count each group once;
* an evaluation loss is the group's mean over its batch, as one process computes it, averaged over batches.

Batches whose length the layout cannot split are padded on the right (labels ``-100``, a document of its
own when packed), which changes no loss; a right-padding ``attention_mask`` is dropped for the same reason.
What cannot be served under sequence parallelism (per-token predictions and metrics, label smoothing, an own
loss function, accelerate's own sequence parallelism) is refused before training starts.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping

import torch

from ..config import AUTO, BLOCK_KEY, LongContextConfig, LongContextConfigError
from .data import IGNORE_INDEX, sequence_multiple, shift_labels
from .replicas import Replicas, gather_over_replicas, prepare_loader_over_replicas, repair_cpu_deepspeed_state

# inputs the distributed attention receives besides those the model's forward names
_ATTENTION_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k")


class TrainerSetupError(LongContextConfigError):
    """A Trainer setting that cannot work under sequence parallelism; the message says what to change."""


def _training_args(args, kwargs):
    if "args" in kwargs:
        return kwargs["args"]
    return args[1] if len(args) > 1 else None


def block_of(training_args) -> LongContextConfig:
    """The validated ``long_context`` block of ``TrainingArguments(deepspeed=...)`` (degrees 1 without one)."""
    hf_config = getattr(training_args, "hf_deepspeed_config", None)
    if hf_config is None:
        raise TrainerSetupError("LongContextTrainer trains through DeepSpeed: pass TrainingArguments(deepspeed="
                                "<ds_config.json or dict>) (--deepspeed ds_config.json), with a long_context block")
    return LongContextConfig.from_block(hf_config.config.get(BLOCK_KEY))


def target_count(batch: Mapping[str, Any]) -> torch.Tensor:
    """Valid next-token targets of a full batch (``shift_labels`` or shifted ``labels``). Scalar int64."""
    targets = batch["shift_labels"] if "shift_labels" in batch else shift_labels(batch["labels"])
    return (targets != IGNORE_INDEX).sum()


def pad_to_layout(batch: Mapping[str, Any], multiple: int) -> Dict[str, Any]:
    """Right-pad ``input_ids`` ``[B, S]`` (and the tensors along its sequence) to a multiple of ``multiple``:
    labels ``-100``, position ids restarting at 0 (packed rows: the padding is a document of its own), a
    right-padding ``attention_mask`` dropped. No loss and no real token's attention changes."""
    out = dict(batch)
    mask = out.get("attention_mask")
    ids = out["input_ids"]
    if mask is not None and "labels" in out and bool((mask[:, 1:] <= mask[:, :-1]).all()) \
            and bool((out["labels"][mask == 0] == IGNORE_INDEX).all()):
        del out["attention_mask"]  # right padding without targets: causal attention never lets a real token see it
    B, S = ids.shape[0], ids.shape[1]
    pad = -S % multiple
    if pad == 0:
        return out
    if "position_ids" in out:
        pos = out["position_ids"]
        out["position_ids"] = torch.cat([pos, torch.arange(pad, device=pos.device).expand(pos.shape[0], pad)], 1)
    fills = {"labels": IGNORE_INDEX, "shift_labels": IGNORE_INDEX, "attention_mask": 0}
    for key, value in batch.items():
        if key == "position_ids" or key not in out or not torch.is_tensor(value) or value.dim() < 2 \
                or value.shape[1] != S or value.shape[0] not in (1, B):
            continue
        filler = value.new_full((value.shape[0], pad) + tuple(value.shape[2:]), fills.get(key, 0))
        out[key] = torch.cat([value, filler], dim=1)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if out.get(key) is not None:  # the padding is one more document
            cu = out[key]
            out[key] = torch.cat([cu, cu.new_tensor([S + pad])])
    return out


class LongContextTrainerMixin:
    """Put before ``transformers.Trainer`` (or a subclass such as TRL's ``SFTTrainer``) in a class's bases;
    same constructor. See the module docstring for what changes."""

    def __init__(self, *args, **kwargs):
        training_args = _training_args(args, kwargs)
        if training_args is not None:
            repair_cpu_deepspeed_state(training_args)
        super().__init__(*args, **kwargs)
        self.long_context_config = block_of(self.args)
        self.long_context_config.check_world(self.args.world_size)
        self.replicas = Replicas.of(self.args.world_size, self.args.process_index, self.long_context_config.sp_degree)
        self.long_context = None  # the engine's LongContext, once the Trainer has built the engine
        self._refuse_unsupported()
        self._route_engine_through_ds_longctx()
        if self.replicas.sp > 1:
            self.gather_function = lambda tensor, **kw: gather_over_replicas(self.accelerator, self.replicas, tensor)

    # --- setup -------------------------------------------------------------------------------------------
    def _refuse_unsupported(self) -> None:
        """Settings that cannot work under sequence parallelism, refused on every rank (they are the same)."""
        if self.args.label_smoothing_factor:
            raise TrainerSetupError("label_smoothing_factor needs the logits of whole sequences; ds_longctx computes "
                                    "the loss of the sharded sequence itself: set label_smoothing_factor=0")
        if self.compute_loss_func is not None:
            raise TrainerSetupError("compute_loss_func would see one rank's shard of the logits; ds_longctx computes "
                                    "the causal-LM loss of the whole sequence: drop compute_loss_func")
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and getattr(pc, "sp_enabled", False):
            raise TrainerSetupError("accelerate's ParallelismConfig sequence parallelism and the long_context block "
                                    "both split sequences: drop parallelism_config's sp_size, keep the block")
        if self.replicas.sp > 1 and (self.compute_metrics is not None or self.preprocess_logits_for_metrics is not None):
            raise TrainerSetupError("compute_metrics / preprocess_logits_for_metrics get per-token predictions, "
                                    "which under sequence parallelism are split over the group's ranks; drop them "
                                    "(evaluation reports the loss)")

    def _route_engine_through_ds_longctx(self) -> None:
        """The Trainer builds its engine in ``accelerator.prepare`` with ``deepspeed.initialize``; during that
        call it is :func:`ds_longctx.initialize`, with the batch-size arithmetic over replicas."""
        accelerator = self.accelerator
        prepare_deepspeed = accelerator._prepare_deepspeed
        trainer = self

        def prepare(*objects):
            import deepspeed

            plain = deepspeed.initialize
            # accelerate fills every "auto" of the config (kernel: "auto" is ours) and refuses unknown ones
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            block = ds_config.pop(BLOCK_KEY, None)

            def through_ds_longctx(**kwargs):
                deepspeed.initialize = plain  # ds_longctx.initialize calls it in turn
                if block is not None:
                    kwargs["config_params"][BLOCK_KEY] = block
                return trainer._initialize_engine(**kwargs)

            deepspeed.initialize = through_ds_longctx
            try:
                return prepare_deepspeed(*objects)
            finally:
                deepspeed.initialize = plain
                if block is not None:
                    ds_config[BLOCK_KEY] = block

        accelerator._prepare_deepspeed = prepare
        accelerator.prepare_data_loader = lambda loader, **kw: prepare_loader_over_replicas(
            accelerator, loader, self.replicas)

    def _initialize_engine(self, **kwargs):
        from .deepspeed import initialize

        config = kwargs.get("config_params") or kwargs.get("config")
        if isinstance(config, dict) and "train_micro_batch_size_per_gpu" in config:
            # accelerate counts every process as a replica; DeepSpeed checks against the mpu's dp replicas
            config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"]
                                          * config.get("gradient_accumulation_steps", 1) * self.replicas.dp)
        engine, optimizer, loader, scheduler = initialize(**kwargs)
        lc = engine.long_context
        assert (lc.topology.dp, lc.topology.dp_rank) == (self.replicas.dp, self.replicas.dp_rank), (lc, self.replicas)
        self.long_context = lc
        return engine, optimizer, loader, scheduler

    # --- batch arithmetic over replicas ------------------------------------------------------------------
    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self.replicas.dp

    def _get_num_items_in_batch(self, batch_samples, device):
        if not batch_samples or not ("labels" in batch_samples[0] or "shift_labels" in batch_samples[0]) \
                or not self.model_accepts_loss_kwargs:
            return None
        count = sum(target_count(batch) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # every group's count arrives U x R times
            count = self.accelerator.gather(count.reshape(1)).sum() // self.replicas.sp
        return count

    def _track_num_input_tokens(self, inputs) -> None:
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // self.replicas.sp

    def floating_point_ops(self, inputs) -> int:
        return super().floating_point_ops(inputs) // self.replicas.sp

    # --- loss --------------------------------------------------------------------------------------------
    def _model_inputs(self, model, batch: Mapping[str, Any]) -> Dict[str, Any]:
        forward = getattr(self.accelerator.unwrap_model(model), "forward")
        named = set(inspect.signature(forward).parameters)
        return {k: v for k, v in batch.items()
                if k in _ATTENTION_INPUTS or (k in named and k not in ("labels", "shift_labels"))}

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The causal-LM loss of the full batch ``inputs`` (``[B, S]``, labels unshifted), computed sharded.

        Training with ``num_items_in_batch``: ``group loss sum / num_items_in_batch`` times the replicas (see
        the module docstring); otherwise the group's mean over its valid targets."""
        lc = self.long_context
        if lc is None:
            raise TrainerSetupError("the engine is not built yet: LongContextTrainer computes losses inside train(), "
                                    "evaluate() and predict()")
        if "labels" not in inputs and "shift_labels" not in inputs:
            raise TrainerSetupError(f"the batch has no labels (keys {sorted(inputs)}); use a causal-LM collator "
                                    f"(e.g. DataCollatorForLanguageModeling(mlm=False), DataCollatorWithFlattening)")
        chunk = lc.config.fpdt.chunk_size  # "auto" resolves in shard_batch to chunks that divide this padding
        full = pad_to_layout(inputs, sequence_multiple(lc.topology, None if chunk == AUTO else chunk))
        local = lc.shard_batch(full)
        outputs = model(**self._model_inputs(model, local), shift_labels=local["shift_labels"])
        loss = outputs.loss
        if model.training and num_items_in_batch is not None:
            scale = target_count(inputs).to(loss.device, loss.dtype) / num_items_in_batch
            if self.args.average_tokens_across_devices:
                scale = scale * self.replicas.dp
            loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        if not prediction_loss_only:
            if self.replicas.sp == 1:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
            raise TrainerSetupError("predictions under sequence parallelism are split over the group's ranks; "
                                    "evaluate() without compute_metrics reports the loss, predict() is not supported")
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach().mean(), None, None


def trainer_class(base: type, name: str) -> type:
    """``class name(LongContextTrainerMixin, base)``: a Trainer class with the long-context setup."""
    return type(name, (LongContextTrainerMixin, base), {"__doc__": f"{base.__name__} with the DeepSpeed config's "
                                                                   f"long_context block (see ds_longctx.trainer)."})


__all__ = ["LongContextTrainerMixin", "TrainerSetupError", "block_of", "pad_to_layout", "target_count",
           "trainer_class"]
