"""Before the first step: resolve the block's ``"auto"`` values and check that the step fits the machine.

:func:`prepare` is what :func:`ds_longctx.initialize` calls. It reads only values every rank shares (the
block, the model's config, the world size, the sequence length) and machine facts that the ranks agree on
first (the smallest GPU and host memory among them), so every rank resolves the same block and raises the
same error, before any step.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ..config import AUTO, BLOCK_KEY, LongContextConfig
from .machine import GIB, Machine
from .model_spec import ModelSpec
from .search import best
from .verdict import Margins, Verdict, judge
from .settings import Run, Settings, ZeroSettings


class PlanError(ValueError):
    """The configuration does not fit the machine (or no configuration does); the message says what would."""


#: Settings fields the block's "auto" values stand for.
_AUTO_FIELDS = {"fpdt.chunk_size": "chunk_size", "fpdt.offload": "fpdt_offload",
                "keep_attention_output": "keep_attention_output", "checkpoint_layers": "checkpoint_layers",
                "checkpoint_offload": "checkpoint_offload_layers", "checkpoint_every": "checkpoint_every",
                "mlp_tile_tokens": "mlp_tile_tokens",
                "loss_tile_tokens": "loss_tile_tokens"}


def fixed_fields(cfg: LongContextConfig, layers: int, zero: ZeroSettings) -> Dict[str, Any]:
    """The Settings fields the block pins (every field that is not "auto")."""
    block = cfg.model_dump(mode="json")
    fixed: Dict[str, Any] = {"ulysses": cfg.ulysses_degree, "ring": cfg.ring_degree,
                             "optimizer_offload": zero.optimizer_offload,
                             "host_optimizer_states": cfg.host_optimizer_states}
    values = {"fpdt.chunk_size": block["fpdt"]["chunk_size"], "fpdt.offload": block["fpdt"]["offload"],
              **{k: block[k] for k in _AUTO_FIELDS if not k.startswith("fpdt.")}}
    for name, field in _AUTO_FIELDS.items():
        value = values[name]
        if value == AUTO:
            continue
        if field == "checkpoint_offload_layers":
            if value is True:  # every checkpointed layer, however many the search checkpoints
                fixed["checkpoint_offload_all"] = True
                continue
            value = int(value or 0)
        if field == "checkpoint_layers" and value is not None and value >= layers:
            value = None  # every layer, as Settings spell it
        fixed[field] = value
    return fixed


def _block_values(settings: Settings, layers: int) -> Dict[str, Any]:
    """The chosen settings as block values of the "auto" fields (dotted names)."""
    block = settings.block(layers)
    return {"fpdt.chunk_size": block["fpdt"]["chunk_size"], "fpdt.offload": block["fpdt"]["offload"],
            **{k: block[k] for k in _AUTO_FIELDS if not k.startswith("fpdt.")}}


def settings_of(cfg: LongContextConfig, layers: int, zero: ZeroSettings) -> Settings:
    """The Settings of a resolved block."""
    return Settings.from_block(cfg.model_dump(mode="json"), layers, zero)


def resolve(cfg: LongContextConfig, run: Run, machine: Machine, margins: Margins, zero: ZeroSettings,
            base: Settings = Settings()) -> LongContextConfig:
    """``cfg`` with its "auto" values chosen: the fastest configuration that fits, the other fields as given.

    Raises :class:`PlanError` when nothing fits with the fields the block pins."""
    if not cfg.auto_fields:
        return cfg
    base = base.with_(kernel=cfg.kernel, lean_rms_norm=cfg.lean_rms_norm, fused_norms=cfg.fused_norms,
                      fused_gated_mlp=cfg.fused_gated_mlp, fused_rope=cfg.fused_rope, zero=zero)
    winner, smallest = best(run, machine, margins, fixed_fields(cfg, run.model.layers, zero), base)
    if winner is None:
        raise PlanError(_nothing_fits(run, machine, smallest, what=f"the {BLOCK_KEY} block's fixed values"))
    values = _block_values(winner.settings, run.model.layers)
    return cfg.resolve({name: values[name] for name in cfg.auto_fields})


def _nothing_fits(run: Run, machine: Machine, smallest: Optional[Verdict], what: str) -> str:
    where = (f"{run.model.name} ({run.model.layers} layers) at {run.seq_len} tokens on {run.world} GPU(s) of "
             f"{machine.gpu_memory / GIB:.1f} GiB with {machine.host_memory / GIB:.1f} GiB of host memory per node")
    if smallest is None:
        return f"no configuration of {where} is valid for {what} (the sequence length cannot be split)"
    return (f"no configuration of {where} fits with {what}; the smallest GPU peak, "
            f"{smallest.settings.block(run.model.layers)}, still does not fit: {smallest.why_not()}. "
            f"Use more GPUs, a shorter sequence, or run ds-longctx plan --seq-len max for the longest that fits")


def check(cfg: LongContextConfig, run: Run, machine: Machine, margins: Margins, zero: ZeroSettings) -> Verdict:
    """The verdict of a resolved block; raises :class:`PlanError` naming the largest components and a
    configuration that fits when it does not fit."""
    verdict = judge(run, settings_of(cfg, run.model.layers, zero), machine, margins)
    if verdict.fits:
        return verdict
    winner, smallest = best(run, machine, margins, {"ulysses": cfg.ulysses_degree, "ring": cfg.ring_degree},
                            Settings(kernel=cfg.kernel, lean_rms_norm=cfg.lean_rms_norm, zero=zero))
    if winner is None:
        winner, smallest = best(run, machine, margins, None, Settings(kernel=cfg.kernel, zero=zero))
    fix = (f"a configuration that fits: {BLOCK_KEY} = {winner.settings.block(run.model.layers)}"
           f"{', optimizer offloaded to the CPU' if winner.settings.zero.optimizer_offload else ''} "
           f"(GPU peak {winner.estimate.gpu_peak / GIB:.1f} GiB)" if winner is not None
           else _nothing_fits(run, machine, smallest, what="any setting"))
    raise PlanError(f"pre-flight: this step would not fit: {verdict.why_not()}. {fix}. Set "
                    f"{BLOCK_KEY}.preflight=false to skip this check.")


def prepare(cfg: LongContextConfig, model_config: Any, ds: Mapping[str, Any], world: int,
            seq_len: Optional[int], machine: Optional[Machine], micro_batch: int = 1,
            checkpointing: bool = True) -> LongContextConfig:
    """Resolve "auto" and run the pre-flight check (when ``cfg.preflight``) for ``ds_longctx.initialize`` (or for
    the first batch, :mod:`ds_longctx.integration.planning`).

    ``model_config``: the transformers config (None: not a transformers model, nothing to plan);
    ``machine``: the facts all ranks agreed on (None: no GPU, no check). Returns the resolved block."""
    seq_len = cfg.seq_len or seq_len
    if model_config is None or seq_len is None or machine is None:
        if cfg.auto_fields:
            raise PlanError(f"{BLOCK_KEY}: {', '.join(cfg.auto_fields)} are \"auto\", which needs "
                            + ("a transformers model" if model_config is None else
                               "a GPU (the plan is made for GPUs; DS_LONGCTX_MACHINE states one's facts)"
                               if machine is None else f"{BLOCK_KEY}.seq_len (the global sequence length)")
                            + "; set them explicitly (ds-longctx plan suggests values)")
        return cfg
    model = ModelSpec.from_config(model_config)
    cfg.check_layers(model.layers)
    run = Run(model=model, world=world, seq_len=seq_len, micro_batch=micro_batch, checkpointing=checkpointing)
    zero = ZeroSettings.from_ds_config(ds)
    margins = Margins.default(machine)
    resolved = resolve(cfg, run, machine, margins, zero)
    if resolved.preflight:
        check(resolved, run, machine, margins, zero)
    return resolved


__all__ = ["PlanError", "check", "fixed_fields", "prepare", "resolve", "settings_of"]
