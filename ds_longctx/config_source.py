"""A DeepSpeed config from what ``deepspeed.initialize(config=...)`` accepts: a dict, a json/hjson file path
or a base64-encoded json string."""
from __future__ import annotations

import base64
import binascii
import os
from typing import Any, Dict, Mapping, Union

from .config_errors import LongContextConfigError

ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise LongContextConfigError(f"duplicate keys {dupes} in the DeepSpeed config; keep one of each")
    return dict(pairs)


def load_ds_config(config: ConfigSource) -> Dict[str, Any]:
    """A DeepSpeed config as a dict, from a dict, a json/hjson file path, or a base64-encoded json string.

    Accepts what ``deepspeed.initialize(config=...)`` accepts. Raises :class:`LongContextConfigError` with
    the path and the parser's message when the file is missing or malformed.
    """
    import hjson

    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, os.PathLike):
        config = os.fspath(config)
    if not isinstance(config, str):
        raise LongContextConfigError(
            f"DeepSpeed config must be a dict or a path to a json file, got {type(config).__name__}")
    looks_like_path = config.endswith((".json", ".hjson", ".conf")) or os.sep in config
    if os.path.exists(config):
        try:
            with open(config, "r") as f:
                loaded = hjson.load(f, object_pairs_hook=_no_duplicate_keys)
        except LongContextConfigError as exc:
            raise LongContextConfigError(f"{config}: {exc}") from None
        except (ValueError, hjson.HjsonDecodeError) as exc:
            raise LongContextConfigError(f"{config}: not valid JSON/HJSON: {exc}") from None
    else:
        missing = LongContextConfigError(f"DeepSpeed config file {config!r} does not exist")
        if looks_like_path:
            raise missing
        try:  # deepspeed.initialize also takes the config as base64-encoded JSON
            decoded = base64.urlsafe_b64decode(config).decode("utf-8")
            loaded = hjson.loads(decoded, object_pairs_hook=_no_duplicate_keys)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise missing from None
        if not isinstance(loaded, Mapping):
            raise missing
    if not isinstance(loaded, Mapping):
        raise LongContextConfigError(f"{config}: the DeepSpeed config must be a JSON object, got "
                                     f"{type(loaded).__name__}")
    return _plain(loaded)


def _plain(x):
    """hjson returns OrderedDicts; plain dicts compare and print the same everywhere."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


__all__ = ["ConfigSource", "load_ds_config"]
