"""Times on the command line: one way to read them, one way to print them.

Read (``--start``, ``--end``, ``--period`` ...): ISO 8601 with ``Z`` or an offset
(``2026-11-01T00:00:00Z``), a date (``2026-11-01``, midnight UTC), a naive time (taken as
UTC), ``now``, or a relative window back from now (``90s``, ``30m``, ``12h``, ``7d``, ``2w``).
Printed: ``2026-11-01T00:00:00Z``, always UTC, to the second.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import click

_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """An aware UTC datetime from any accepted form; ``ValueError`` says which forms exist."""
    now = now or datetime.now(UTC)
    value = text.strip()
    if value.lower() == "now":
        return now
    rel = _RELATIVE.match(value)
    if rel:
        return now - timedelta(seconds=int(rel.group(1)) * _UNIT_S[rel.group(2)])
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO 8601 (2026-11-01T00:00:00Z, 2026-11-01), "
            "'now', or a window back from now (30m, 12h, 7d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def fmt_time(when: datetime | None) -> str:
    """``2026-11-01T00:00:00Z``; ``-`` for no time."""
    if when is None:
        return "-"
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class When(click.ParamType):
    """A click parameter accepting every form :func:`parse_when` reads."""

    name = "time"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        try:
            return parse_when(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


WHEN = When()
