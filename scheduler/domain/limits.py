"""Bounds every input is checked against, so that no value the database cannot store ever
reaches it: a bad value is a 422 naming the field, never a 500."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, field_validator

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


class CleanText(BaseModel):
    """Base of every input model: text anywhere in it may not contain NUL (PostgreSQL text
    cannot store it)."""

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        return _reject_nul(value)
