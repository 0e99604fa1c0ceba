"""Jobs for the ``deepspeed.initialize`` hook tests: training through each way of passing the config, and a
one-process probe of how the hook gets installed (run in a fresh interpreter: installation happens at import).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List

import torch

from tests.deepspeed_cases import _quiet, build_model, ds_config, full_batch

# how the config reaches the initialize function
FORMS = ("dict", "config_params", "path", "args")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def train_through(initializer: str, form: str, config_dir: str, steps: int, seq_len: int, batch_size: int,
                  block: bool = True, ulysses: int = 1, ring: int = 2) -> dict:
    """Every rank: build the engine with ``initializer`` (``"ds_longctx"``: ``ds_longctx.initialize``;
    ``"deepspeed"``: the module attribute ``deepspeed.initialize``, hooked; ``"deepspeed_own"``: DeepSpeed's
    function the hook wraps), the config given as ``form`` (:data:`FORMS`; with ``args`` the args go first,
    positionally, as scripts pass them), with the ``long_context`` block or without; train ``steps`` steps.
    Returns the losses, whether the engine has ``long_context``, the attention the model runs and the hook's
    log lines on this rank during initialize."""
    import deepspeed
    import torch.distributed as dist

    import ds_longctx
    from ds_longctx.integration import deepspeed_hook

    os.environ.setdefault("LOCAL_RANK", "0")
    _quiet()
    rank = dist.get_rank()
    model = build_model("llama", seq_len)
    config = ds_config(ulysses, ring, batch_size)
    if not block:
        del config["long_context"]
    init = {"ds_longctx": ds_longctx.initialize, "deepspeed": deepspeed.initialize,
            "deepspeed_own": getattr(deepspeed.initialize, "__wrapped__", None)}[initializer]
    args, kwargs = (), {"model": model, "model_parameters": model.parameters()}
    if form in ("dict", "config_params"):
        kwargs[{"dict": "config"}.get(form, form)] = config
    else:
        path = os.path.join(config_dir, f"ds_config_rank{rank}.json")  # one file per rank: no write races
        with open(path, "w") as f:
            json.dump(config, f)
        if form == "path":
            kwargs["config"] = path
        else:
            args = (argparse.Namespace(deepspeed_config=path, local_rank=0),)
    records = _Records()
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.addHandler(records)
    announced_before = deepspeed_hook._announced
    try:
        engine, _, _, _ = init(*args, **kwargs)
    finally:
        ds_logger.removeHandler(records)
    lc = getattr(engine, "long_context", None)
    losses = []
    for step in range(steps):
        if lc is not None:
            batch = lc.shard_batch(full_batch(step, lc.topology.dp_rank, batch_size, seq_len))
            logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            loss = lc.loss(logits, batch["shift_labels"])
        else:  # plain data parallelism: every rank its own whole sequences
            batch = full_batch(step, rank, batch_size, seq_len)
            logits = engine(input_ids=batch["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    result = {"losses": losses, "has_long_context": lc is not None,
              "sp": lc.topology.sp if lc is not None else None,
              "attn_impl": engine.module.config._attn_implementation,
              "hook_log": [m for m in records.messages if "long_context block" in m],
              "announced_before": announced_before}
    engine.destroy()
    return result


def initialize_error_through_hook(case: str) -> str:
    """Every rank: ``deepspeed.initialize`` with a block whose degrees do not divide the world (``"degrees"``),
    or a valid block given to DeepSpeed's own function, as held by code that bound it before importing
    ds_longctx (``"stale_reference"``); what it raised."""
    import deepspeed

    import ds_longctx  # noqa: F401 - installs the hook

    os.environ.setdefault("LOCAL_RANK", "0")
    _quiet()
    model = build_model("llama", 32)
    if case == "degrees":
        init, config = deepspeed.initialize, ds_config(3, 1, 1)
    elif case == "stale_reference":
        init, config = deepspeed.initialize.__wrapped__, ds_config(1, 2, 1)
    else:
        raise ValueError(case)
    try:
        init(model=model, model_parameters=model.parameters(), config=config)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def probe(order: str, init_file: str) -> None:
    """In a fresh one-rank process: import ``ds_longctx`` and ``deepspeed`` in ``order`` (``"ds_longctx_first"``
    or ``"deepspeed_first"``), install the hook once more (a second install changes nothing), build an engine
    through ``deepspeed.initialize`` from a config with the block; print what was seen as JSON."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")
    if order == "ds_longctx_first":
        import ds_longctx
        light = "deepspeed" not in sys.modules
        import deepspeed
    else:
        import deepspeed

        import ds_longctx
        light = None
    from ds_longctx.integration import deepspeed_hook

    _quiet()
    hooked = deepspeed.initialize
    reinstalled = deepspeed_hook.install()
    model = build_model("llama", 32)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(1, 1, 1))
    print(json.dumps({
        "light_import": light,
        "hook_installed": ds_longctx.deepspeed_hook_installed(),
        "reinstalled": reinstalled,
        "same_function_after_reinstall": deepspeed.initialize is hooked,
        "wraps_deepspeeds_own": getattr(deepspeed.initialize, "__wrapped__", None) is not None
        and deepspeed.initialize.__wrapped__.__module__ == "deepspeed"
        and not hasattr(deepspeed.initialize.__wrapped__, "__wrapped__"),
        "has_long_context": hasattr(engine, "long_context"),
    }))
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    probe(*sys.argv[1:])
