"""Bounds every input is checked against, so that no value the database cannot store ever
reaches it: a bad value is a 422 naming the field, never a 500."""

from __future__ import annotations

import sys
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, field_validator
from pydantic._internal._model_construction import ModelMetaclass

INT32_MAX = 2**31 - 1  # INTEGER columns (ids, counts)
INT64_MAX = 2**63 - 1  # BIGINT columns (bytes, milliwatts, millijoules)


def _reject_nul(value: Any) -> Any:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_nul(k)
            _reject_nul(v)
    if isinstance(value, list | tuple):
        for v in value:
            _reject_nul(v)
    return value


_NO_TEXT = frozenset({"int", "bool", "float", "datetime", "AwareDatetime", "date", "Decimal"})
"""Annotations whose validated values cannot hold text (hence no NUL)."""


def _may_hold_text(annotation: Any, scope: dict[str, Any]) -> bool:
    """False for numbers, times and enums (looked up in the defining module's ``scope``),
    alone or with None; True for anything else, and for what cannot be read."""
    spelled = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if not spelled:
        return True
    for part in {p.strip() for p in spelled.split("|")} - {"None"}:
        if part.startswith("list[") and part.endswith("]"):
            part = part[5:-1]
        named = scope.get(part)
        if isinstance(named, type) and issubclass(named, CleanText):
            continue  # a model (or a list of them) checks its own text: nothing to walk
        if part not in _NO_TEXT and not (isinstance(named, type) and issubclass(named, Enum)):
            return True
    return False


def _no_nul(cls: type, value: Any) -> Any:
    return _reject_nul(value)


class _CleanTextMeta(ModelMetaclass):
    """Puts the NUL check on the fields that may hold text, and only on those: the check
    is a Python call per field, and numbers (most of a heartbeat's GPU samples) cannot
    hold NUL."""

    def __new__(
        mcs,
        name: str,
        bases: tuple[type, ...],
        namespace: dict[str, Any],
        nul_check: bool = True,
        **kwargs: Any,
    ) -> type:
        if not nul_check:  # the model that holds this one checks its text (see below)
            return super().__new__(mcs, name, bases, namespace, **kwargs)
        module = sys.modules.get(namespace.get("__module__", ""))
        scope = vars(module) if module is not None else {}
        fields = [
            f
            for f, a in namespace.get("__annotations__", {}).items()
            if not f.startswith("_") and "ClassVar" not in str(a) and _may_hold_text(a, scope)
        ]
        if fields:
            namespace["_no_nul_in_text"] = field_validator(
                *fields, mode="after", check_fields=False
            )(classmethod(_no_nul))
        return super().__new__(mcs, name, bases, namespace, **kwargs)


if TYPE_CHECKING:  # type checkers see a plain model (the metaclass adds a validator only)

    class CleanText(BaseModel):
        """Base of every input model (see below)."""

else:

    class CleanText(BaseModel, metaclass=_CleanTextMeta):
        """Base of every input model: text anywhere in it may not contain NUL (PostgreSQL
        text cannot store it)."""


def reject_nul_in(items: Any, fields: tuple[str, ...], where: str) -> None:
    """The NUL check of a list of models declared ``nul_check=False`` (GPU samples and
    evidence windows, thousands a second), in one call from the model that holds them:
    ``ValueError`` naming ``where.N.field``."""
    for i, item in enumerate(items):
        for name in fields:
            value = getattr(item, name)
            values = value if isinstance(value, list) else (value,)
            if any(isinstance(v, str) and "\x00" in v for v in values):
                raise ValueError(f"{where}.{i}.{name} must not contain NUL characters")
