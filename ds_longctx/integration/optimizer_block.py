"""``long_context.host_optimizer_states``: the DeepSpeed config's optimizer block as a
:class:`~ds_longctx.memory.HostStateAdamW`, handed to ``deepspeed.initialize`` as the client optimizer.

The block means what DeepSpeed 0.19.8 makes of it (``DeepSpeedEngine._configure_basic_optimizer`` and
``get_optimizer_configuration``): type ``AdamW`` is always decoupled weight decay; type ``Adam`` is too unless
``adam_w_mode`` is false (then L2 weight decay, which is refused unless ``weight_decay`` is 0); with
``torch_adam`` the optimizer is ``torch.optim.AdamW`` (``weight_decay`` defaults to 0.01), else DeepSpeed's
``FusedAdam`` (``weight_decay`` defaults to 0, ``bias_correction`` must stay true). Anything else the block
asks for that :class:`HostStateAdamW` cannot honour is refused with what to change.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, NamedTuple

from ..config import BLOCK_KEY, LongContextConfigError

FLAG = f"{BLOCK_KEY}.host_optimizer_states"
#: Optimizer keys that choose an implementation only (DeepSpeed pops them or they change no arithmetic).
_IMPLEMENTATION_KEYS = {"torch_adam", "adam_w_mode", "fp32_optimizer_states", "foreach", "fused", "capturable",
                        "set_grad_none"}
#: Keys that must keep the value HostStateAdamW implements.
_REQUIRED_VALUES = {"amsgrad": False, "maximize": False, "differentiable": False, "bias_correction": True}


class AdamWHyperparameters(NamedTuple):
    """What the block sets: ``torch.optim.AdamW``'s arguments."""

    lr: float
    betas: tuple
    eps: float
    weight_decay: float


def _refuse(what: str) -> LongContextConfigError:
    return LongContextConfigError(f"{FLAG}: {what}; or set {FLAG} false")


def _number(params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(f"optimizer.params.{key} is {value!r}; give a number")
    return float(value)


def adamw_hyperparameters(ds: Mapping[str, Any]) -> AdamWHyperparameters:
    """The AdamW of the DeepSpeed config ``ds``'s optimizer block, as DeepSpeed would build it; raises
    :class:`~ds_longctx.config.LongContextConfigError` for what HostStateAdamW cannot honour."""
    block = ds.get("optimizer")
    if not isinstance(block, Mapping) or not block.get("type"):
        raise _refuse("the DeepSpeed config has no optimizer block, which the moments' AdamW is built from; add "
                      "\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": ..., \"weight_decay\": ...}}")
    kind = str(block["type"]).lower()
    if kind not in ("adamw", "adam"):
        raise _refuse(f"optimizer type {block['type']!r} is not supported (only AdamW and Adam keep their moments "
                      f"in host memory); use type AdamW")
    params = dict(block.get("params") or {})
    if "max_grad_norm" in params:
        raise _refuse("optimizer.params.max_grad_norm is not an optimizer parameter in DeepSpeed; use the "
                      "config's gradient_clipping")
    unknown = sorted(set(params) - _IMPLEMENTATION_KEYS - set(_REQUIRED_VALUES)
                     - set(AdamWHyperparameters._fields))
    if unknown:
        raise _refuse(f"optimizer.params {unknown} are not AdamW parameters HostStateAdamW knows; remove them")
    for key, value in _REQUIRED_VALUES.items():
        if key in params and params[key] != value:
            raise _refuse(f"optimizer.params.{key}={params[key]!r} is not supported; set it to {value}")
    torch_adam = bool(params.get("torch_adam", False))
    weight_decay = _number(params, "weight_decay", 0.01 if torch_adam else 0.0)
    decoupled = kind == "adamw" or bool(params.get("adam_w_mode", True))
    if not decoupled and weight_decay != 0:
        raise _refuse("optimizer type Adam with adam_w_mode false adds weight_decay to the gradient (L2), which "
                      "HostStateAdamW does not do; set adam_w_mode true or type AdamW (decoupled weight decay), "
                      "or weight_decay 0")
    betas = params.get("betas", (0.9, 0.999))
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        raise _refuse(f"optimizer.params.betas is {betas!r}; give two numbers")
    return AdamWHyperparameters(lr=_number(params, "lr", 1e-3), betas=tuple(float(b) for b in betas),
                                eps=_number(params, "eps", 1e-8), weight_decay=weight_decay)


def check_host_optimizer(ds: Mapping[str, Any], optimizer_given: bool) -> None:
    """The errors a user can cause with the flag on (read from values every rank holds, before any collective)."""
    if optimizer_given:
        raise _refuse("an optimizer object was passed to initialize, but the moments' AdamW is built from the "
                      "config's optimizer block; drop the optimizer argument and describe AdamW in the block")
    zero = ds.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {}
    if offload.get("device", "none") not in ("none", None):
        raise _refuse(f"zero_optimization.offload_optimizer (device {offload.get('device')!r}) moves the whole "
                      f"optimizer, moments included, to the CPU, where it also steps; remove offload_optimizer "
                      f"to keep the step on the GPU")
    adamw_hyperparameters(ds)


def build_host_optimizer(ds: Mapping[str, Any], params) -> Any:
    """The :class:`~ds_longctx.memory.HostStateAdamW` of ``ds``'s optimizer block over ``params`` (tensors or
    param groups)."""
    from ..memory.host_optimizer import HostStateAdamW

    return HostStateAdamW(params, **adamw_hyperparameters(ds)._asdict())


def config_for_client_optimizer(ds: Mapping[str, Any]) -> Dict[str, Any]:
    """``ds`` for DeepSpeed with the optimizer given as an object: no optimizer block (DeepSpeed refuses both),
    ZeRO told the client optimizer is fine (it is AdamW, stepping the partitions DeepSpeed hands it); the
    scheduler block stays and is built on the client optimizer."""
    handed = copy.deepcopy(dict(ds))
    handed.pop("optimizer", None)
    handed["zero_allow_untested_optimizer"] = True
    return handed


def client_optimizer_kwargs(ds: Mapping[str, Any], model, model_parameters, args) -> Dict[str, Any]:
    """What changes in the ``deepspeed.initialize`` call: the HostStateAdamW as ``optimizer``, the parameters it
    steps as ``model_parameters`` (a list, read once), the config without its optimizer block as ``config``
    (taken out of ``args``, which DeepSpeed would otherwise read it from)."""
    params = list(model_parameters if model_parameters is not None else model.parameters())
    if args is not None and (getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)):
        args = copy.copy(args)
        for name in ("deepspeed_config", "deepscale_config"):
            if hasattr(args, name):
                setattr(args, name, None)
    return {"optimizer": build_host_optimizer(ds, params), "model_parameters": params,
            "config": config_for_client_optimizer(ds), "config_params": None, "args": args}


__all__ = ["AdamWHyperparameters", "adamw_hyperparameters", "build_host_optimizer", "check_host_optimizer",
           "client_optimizer_kwargs", "config_for_client_optimizer"]
