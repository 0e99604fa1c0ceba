"""ds_longctx: exact long-context attention for DeepSpeed (hybrid Ulysses x ring, FPDT chunking, ZeRO-3).

``ds_longctx.initialize`` is a drop-in for ``deepspeed.initialize`` that reads the ``"long_context"`` block of
the DeepSpeed config; once the package is imported, ``deepspeed.initialize`` itself hands configs with the
block to it (:mod:`ds_longctx.integration.deepspeed_hook`; ``DS_LONGCTX_DEEPSPEED_HOOK=0`` turns that off).
Importing the package stays light: DeepSpeed and transformers are imported only when ``initialize`` (or an
integration module) is used; the hook patches DeepSpeed when DeepSpeed gets imported.
"""
from __future__ import annotations

from .integration import deepspeed_hook as _deepspeed_hook

__version__ = "0.1.0"

_deepspeed_hook.install()


def deepspeed_hook_installed() -> bool:
    """Whether ``deepspeed.initialize`` routes configs with a ``long_context`` block to ``ds_longctx.initialize``
    (False with ``DS_LONGCTX_DEEPSPEED_HOOK=0``); imports nothing."""
    return _deepspeed_hook.installed()


_LAZY = {
    "initialize": ("ds_longctx.integration.deepspeed", "initialize"),
    "LongContextConfig": ("ds_longctx.config", "LongContextConfig"),
    "LongContextConfigError": ("ds_longctx.config", "LongContextConfigError"),
    "Topology": ("ds_longctx.topology", "Topology"),
    "attention": ("ds_longctx.attention", "attention"),
    "shard_batch": ("ds_longctx.integration.data", "shard_batch"),
    "causal_lm_loss": ("ds_longctx.integration.loss", "causal_lm_loss"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ds_longctx' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["__version__", "deepspeed_hook_installed"] + list(_LAZY)
