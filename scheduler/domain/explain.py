"""Validation errors as sentences a person can act on.

Pydantic's messages are written for programmers ("Input should be greater than or equal to
1", "Extra inputs are not permitted"). The CLI and the API both pass their errors through
:func:`explain_errors`, so an engineer reads the same sentence whether the spec was checked
locally or by the server: ``gpus: unknown field; did you mean gpus_per_worker?``.

Only the ``msg`` of each error changes; ``loc`` and ``type`` keep pydantic's values, so
clients that key on them keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel

# Field-specific sentences for errors whose generic text says too little.
_PATTERN_HELP = {
    "name": "must be a lower-case DNS label: letters, digits and '-', at most 63 characters, "
    "starting and ending with a letter or digit",
}


def explain_errors(
    errors: Iterable[Mapping[str, Any]], model: type[BaseModel] | None = None
) -> list[dict[str, Any]]:
    """Each error with a readable ``msg``; ``model`` (the body's model) enables suggestions."""
    out = []
    for err in errors:
        item = {k: v for k, v in err.items() if k in ("loc", "msg", "type", "input", "ctx")}
        item["msg"] = _sentence(err, model)
        item.pop("input", None)
        item.pop("ctx", None)
        out.append(item)
    return out


def format_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """``field: problem; field: problem`` with transport prefixes (body, query) dropped."""
    parts = []
    for item in errors:
        loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
        parts.append(f"{'.'.join(loc) or 'request'}: {item.get('msg', item)}")
    return "; ".join(parts)


def _sentence(err: Mapping[str, Any], model: type[BaseModel] | None) -> str:
    kind = str(err.get("type", ""))
    ctx = err.get("ctx") or {}
    loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    field = str(loc[-1]) if loc else ""
    given = err.get("input")
    if kind == "extra_forbidden":
        fields = _fields(model, loc[:-1]) if model else {}
        options = sorted(fields)
        close = difflib.get_close_matches(field, options, n=4, cutoff=0.5)
        close += [o for o in options if o.startswith(field) and o not in close]
        # Prefer a field that could take the value given: `gpus: 2` means gpus_per_worker,
        # not the `gpu` mapping.
        fitting = [c for c in close if _accepts(fields[c], given)]
        text = "unknown field"
        if fitting or close:
            return f"{text}; did you mean {(fitting or close)[0]}?"
        if options:
            return f"{text}; expected one of {', '.join(sorted(options))}"
        return text
    if kind == "missing":
        return "required, but missing"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        limit = next(iter(ctx.values()), None)
        word = {
            "greater_than_equal": "at least",
            "greater_than": "more than",
            "less_than_equal": "at most",
            "less_than": "less than",
        }[kind]
        return f"must be {word} {limit} (got {given!r})"
    if kind == "string_pattern_mismatch":
        return _PATTERN_HELP.get(field, f"does not have the expected form {ctx.get('pattern')}")
    if kind in ("string_too_long", "too_long"):
        return f"is too long: at most {ctx.get('max_length')} allowed"
    if kind in ("string_too_short", "too_short"):
        least = ctx.get("min_length")
        return "must not be empty" if least == 1 else f"is too short: at least {least} needed"
    if kind == "enum":
        return f"must be one of {ctx.get('expected')} (got {given!r})"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be a whole number (got {given!r})"
    if kind in ("bool_parsing", "bool_type"):
        return f"must be true or false (got {given!r})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping of fields (got {type(given).__name__})"
    if kind in ("string_type",):
        return f"must be text (got {type(given).__name__})"
    if kind == "timezone_aware":
        return "must carry a time zone, e.g. 2026-11-01T00:00:00Z"
    if kind == "value_error":
        msg = str(err.get("msg", ""))
        return msg.removeprefix("Value error, ")
    return str(err.get("msg", kind))


def _fields(model: type[BaseModel], path: Sequence[Any]) -> dict[str, Any]:
    """Field name (and alias) -> annotation, of the model found by following ``path``."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return {}
        current = _model_of(fields[part].annotation)
        if current is None:
            return {}
    out: dict[str, Any] = {}
    for name, info in getattr(current, "model_fields", {}).items():
        out[name] = info.annotation
        if info.alias:
            out[info.alias] = info.annotation
    return out


def _accepts(annotation: Any, value: Any) -> bool:
    """Roughly: could a field of this type take this value (mapping vs list vs scalar)?"""
    wants_mapping = _model_of(annotation) is not None or _origin_is(annotation, dict)
    wants_list = _origin_is(annotation, list)
    if isinstance(value, dict):
        return wants_mapping
    if isinstance(value, list):
        return wants_list
    return not (wants_mapping or wants_list)


def _origin_is(annotation: Any, kind: type) -> bool:
    if annotation is kind or get_origin(annotation) is kind:
        return True
    return any(_origin_is(arg, kind) for arg in get_args(annotation))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None or get_args(annotation):
        for arg in get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None
