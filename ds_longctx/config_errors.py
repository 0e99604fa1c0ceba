"""The errors of the ``"long_context"`` block: the exception a user's mistake raises, and pydantic's
validation errors written as one message that names each field and what to change."""
from __future__ import annotations

import difflib
import json
from typing import Any, Dict, List, Tuple

from pydantic import BaseModel, ValidationError

BLOCK_KEY = "long_context"


class LongContextConfigError(ValueError):
    """An invalid or inconsistent ``long_context`` block; the message names the field and what to change."""


def _field_names(model: type, loc: Tuple[Any, ...]) -> List[str]:
    """Allowed keys at the level of ``loc`` (the loc of an extra key, whose last item is the key itself)."""
    cls = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return []
    return list(cls.model_fields)


def _field_loc(model: type, loc: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """The part of an error's ``loc`` that names fields (a union adds its member's tag after the field)."""
    cls, kept = model, []
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) and cls is not None else None
        if field is None:
            break
        kept.append(part)
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return tuple(kept) if kept else loc


def format_validation_error(exc: ValidationError, model: type) -> str:
    """pydantic's errors of ``model`` (the block's class) as one message, a line per field: the dotted field, what
    was wrong and the value given; an unknown key with the allowed keys and the closest one."""
    lines: List[str] = []
    union_lines: Dict[Tuple[Any, ...], List[str]] = {}
    values: Dict[Tuple[Any, ...], Any] = {}
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        path = ".".join([BLOCK_KEY] + [str(p) for p in loc])
        if err.get("type") == "extra_forbidden":
            allowed = _field_names(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"{path}: unknown key{hint} (allowed keys here: {', '.join(allowed)})")
            continue
        field = _field_loc(model, loc)
        if field != loc:  # one line per field of a union, with what each member wanted
            union_lines.setdefault(field, []).append(str(err.get("msg")).replace("Input should be ", ""))
            values[field] = err.get("input")
            continue
        value = err.get("input")
        lines.append(f"{path}: {err.get('msg')} (got {json.dumps(value) if _jsonable(value) else repr(value)})")
    for field, wanted in union_lines.items():
        value = values[field]
        path = ".".join([BLOCK_KEY] + [str(p) for p in field])
        lines.append(f"{path}: should be {' or '.join(wanted)} (got "
                     f"{json.dumps(value) if _jsonable(value) else repr(value)})")
    return "invalid " + BLOCK_KEY + " block:\n  " + "\n  ".join(lines)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


__all__ = ["BLOCK_KEY", "LongContextConfigError", "format_validation_error"]
