"""``deepspeed.initialize`` honours the ``long_context`` block once ``ds_longctx`` is imported.

``import ds_longctx`` replaces the module attribute ``deepspeed.initialize`` by :func:`_hooked` around
DeepSpeed's own function: a call whose config (``config``, ``config_params``, ``args.deepspeed_config`` or
``args.deepscale_config``; a dict, a json/hjson path or base64 json) holds a ``long_context`` block goes to
:func:`ds_longctx.initialize` (one code path, the same four values, ``engine.long_context`` set); any other
call reaches DeepSpeed's function untouched. accelerate (and through it transformers' Trainer and TRL) reads
``deepspeed.initialize`` when it prepares the model, so it is routed too.

Not reached: a name bound before ``ds_longctx`` was imported (``from deepspeed import initialize`` run
earlier) is DeepSpeed's own function, as are copies of it (MS-AMP's). So that a block never goes unheeded,
DeepSpeed's engine refuses a config with the block that did not come through ``ds_longctx.initialize``,
saying what to change. ``DS_LONGCTX_DEEPSPEED_HOOK=0`` in the environment leaves DeepSpeed alone (and the
block ignored, as without ``ds_longctx``).

When it is installed: ``import deepspeed`` takes seconds (about 3 s on a CPU machine, 1 s more than torch,
and it probes the accelerator), while ``import ds_longctx`` takes milliseconds and many uses (the
functional API, ``ds-longctx validate``) never need DeepSpeed. So DeepSpeed is never imported for the hook:
an already imported ``deepspeed`` is patched at once, otherwise a one-shot import finder patches it right
after its ``__init__`` has run, whoever imports it.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping  # loaded by the interpreter's start already, unlike typing

OPT_OUT_ENV = "DS_LONGCTX_DEEPSPEED_HOOK"
_OFF_VALUES = ("0", "false", "off", "no")
# Marks our wrapper (the value is DeepSpeed's function it wraps); also read through other libraries'
# functools.wraps wrappers, which copy a function's __dict__.
_MARK = "__ds_longctx_wraps__"

_announced = False  # the routing log line is printed once per process


def opted_out() -> bool:
    """Whether the environment turns the hook off (``DS_LONGCTX_DEEPSPEED_HOOK=0``)."""
    return os.environ.get(OPT_OUT_ENV, "1").strip().lower() in _OFF_VALUES


def install() -> bool:
    """Route ``deepspeed.initialize`` calls that carry a ``long_context`` block to ``ds_longctx.initialize``.

    Idempotent; never imports DeepSpeed (see the module docstring). Returns whether the hook is (or will be,
    on ``import deepspeed``) in place: False when ``DS_LONGCTX_DEEPSPEED_HOOK=0`` is set."""
    if opted_out():
        return False
    module = sys.modules.get("deepspeed")
    if module is not None:
        _patch(module)
    elif not any(getattr(finder, _MARK, False) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    return True


def installed() -> bool:
    """Whether ``deepspeed.initialize`` routes ``long_context`` configs: it is our wrapper, or DeepSpeed is
    not imported yet and will be patched when it is."""
    module = sys.modules.get("deepspeed")
    if module is None:
        return any(getattr(finder, _MARK, False) for finder in sys.meta_path)
    return getattr(getattr(module, "initialize", None), _MARK, None) is not None


def how_the_block_is_read() -> str:
    """Which calls read a ``long_context`` block, for ``ds-longctx validate`` (this environment's opt-out included)."""
    lines = ["ds_longctx.initialize reads the long_context block; so does deepspeed.initialize (also when "
             "accelerate calls it) in a process that has imported ds_longctx, and the engine then has "
             "engine.long_context. In a process that never imports ds_longctx, DeepSpeed ignores the block: no "
             "engine.long_context, every rank runs the whole sequence."]
    if opted_out():
        lines.append(f"{OPT_OUT_ENV}={os.environ[OPT_OUT_ENV]} is set here: deepspeed.initialize leaves the "
                     "block to DeepSpeed, which ignores it; call ds_longctx.initialize or unset it.")
    return "\n".join(lines)


def _patch(module) -> None:
    original = getattr(module, "initialize", None)
    if callable(original) and getattr(original, _MARK, None) is None:  # else not the DeepSpeed we know, or done
        module.initialize = _make_hooked(original)
    engine = getattr(getattr(getattr(module, "runtime", None), "engine", None), "DeepSpeedEngine", None)
    if engine is not None and getattr(engine.__init__, _MARK, None) is None:
        engine.__init__ = _refusing_unrouted_blocks(engine.__init__)


def _refusing_unrouted_blocks(engine_init: Callable) -> Callable:
    """``DeepSpeedEngine.__init__`` raising on a config with the block that bypassed ``ds_longctx.initialize``
    (DeepSpeed's ``initialize`` hands the engine the config as a dict, on every rank alike)."""

    @functools.wraps(engine_init)
    def __init__(self, *args, **kwargs):
        from ..config import BLOCK_KEY, LongContextConfigError
        from . import deepspeed as ours

        config = kwargs.get("config")
        if isinstance(config, Mapping) and BLOCK_KEY in config and not ours.calling_deepspeed():
            raise LongContextConfigError(
                "this DeepSpeed config has a long_context block, but the engine is being built by DeepSpeed's "
                "own initialize, which ignores the block: a reference to deepspeed.initialize taken before "
                "`import ds_longctx` (`from deepspeed import initialize`), or a copy of it. Call "
                "ds_longctx.initialize, or deepspeed.initialize after `import ds_longctx`; or set "
                f"{OPT_OUT_ENV}=0 to train without the block")
        engine_init(self, *args, **kwargs)

    setattr(__init__, _MARK, engine_init)
    return __init__


class _PatchOnImport:
    """An import finder (``sys.meta_path``; importlib.abc costs as much as the rest of the package to import)
    that finds nothing itself; hands ``deepspeed``'s own loader an ``exec_module`` that patches afterwards."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "deepspeed":
            return None
        sys.meta_path.remove(self)  # one shot, and the search below must not come back here
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _patch(module)

        # on the loader instance of this one module: the spec and loader stay DeepSpeed's (resources, reloads)
        loader.exec_module = exec_then_patch
        return spec


setattr(_PatchOnImport, _MARK, True)


def _make_hooked(original: Callable) -> Callable:
    """``deepspeed.initialize``'s replacement; keeps DeepSpeed's name, docstring and signature for help()."""

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        return _hooked(original, args, kwargs)

    setattr(initialize, _MARK, original)
    return initialize


def _hooked(original: Callable, args: tuple, kwargs: dict):
    """``ds_longctx.initialize(**arguments)`` when the config holds the block, else ``original(*args, **kwargs)``
    as called; ``ds_longctx.initialize``'s own call of ``deepspeed.initialize`` goes straight to ``original``."""
    from . import deepspeed as ours

    if ours.calling_deepspeed():
        return original(*args, **kwargs)  # ds_longctx.initialize finishing with DeepSpeed's own
    bound = _bind(ours.initialize, args, kwargs)
    with_block = [s for s in _config_sources(bound if bound is not None else kwargs, args) if _holds_block(s)]
    if not with_block:
        return original(*args, **kwargs)
    if bound is None:
        from ..config import LongContextConfigError

        raise LongContextConfigError(
            "deepspeed.initialize got a long_context block together with arguments ds_longctx.initialize does "
            f"not take ({sorted(set(kwargs) - _parameters(ours.initialize))}); drop them or set "
            f"{OPT_OUT_ENV}=0 to leave the block to DeepSpeed, which ignores it")
    _announce(with_block[0])
    return ours.initialize(**bound)


def _parameters(fn) -> set:
    import inspect

    return set(inspect.signature(fn).parameters)


def _bind(fn, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name, or None when ``fn`` does not take them (a newer DeepSpeed's)."""
    import inspect

    try:
        return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)
    except TypeError:
        return None


def _config_sources(named: dict, args: tuple) -> list:
    """Every place DeepSpeed may take the config from (it refuses more than one itself)."""
    cli = named.get("args", args[0] if args else None)
    return [named.get("config"), named.get("config_params"),
            getattr(cli, "deepspeed_config", None), getattr(cli, "deepscale_config", None)]


def _holds_block(source) -> bool:
    """Whether ``source`` reads, on this rank, as a DeepSpeed config with a ``long_context`` block.

    A config this rank cannot read goes to DeepSpeed unchanged, which raises its own error here: routing
    it instead would turn that error into a silent wait of this rank for the others."""
    from ..config import BLOCK_KEY, LongContextConfigError, load_ds_config

    if isinstance(source, Mapping):
        return BLOCK_KEY in source
    if not isinstance(source, (str, os.PathLike)):
        return False
    try:
        return BLOCK_KEY in load_ds_config(source)
    except LongContextConfigError:
        return False


def _announce(source) -> None:
    """One log line on rank 0, the first time a config is routed; on DeepSpeed's logger, at warning level,
    the lowest it shows by default: whoever did not know of the hook must see that the call was redirected."""
    global _announced
    if _announced:
        return
    _announced = True
    import torch.distributed as dist
    from deepspeed.utils import logger

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        which = (os.fspath(source) if isinstance(source, (str, os.PathLike)) and os.path.exists(source)
                 else "the DeepSpeed config")
        logger.warning(f"ds_longctx: {which} has a long_context block: deepspeed.initialize sets the engine up "
                       f"through ds_longctx.initialize ({OPT_OUT_ENV}=0 turns this off)")
