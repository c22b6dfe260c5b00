"""Accounting periods: the windows statements cover and the ledger never lets a usage row
cross.

The default is the UTC calendar month ("2026-11"). Shorter grains exist for tests and
demos that cannot wait a month ("day": 2026-11-03, "hour": 2026-11-03T14, "minute":
2026-11-03T14:05). A period is [start, end); every instant belongs to exactly one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum


class Grain(StrEnum):
    month = "month"
    day = "day"
    hour = "hour"
    minute = "minute"


_FORMATS = {
    Grain.month: ("%Y-%m", re.compile(r"^\d{4}-\d{2}$")),
    Grain.day: ("%Y-%m-%d", re.compile(r"^\d{4}-\d{2}-\d{2}$")),
    Grain.hour: ("%Y-%m-%dT%H", re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}$")),
    Grain.minute: ("%Y-%m-%dT%H:%M", re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}$")),
}


@dataclass(frozen=True, slots=True, order=True)
class Period:
    start: datetime
    end: datetime
    grain: Grain

    @property
    def label(self) -> str:
        return self.start.strftime(_FORMATS[self.grain][0])

    def next(self) -> Period:
        return period_of(self.end, self.grain)

    def previous(self) -> Period:
        return period_of(self.start - timedelta(microseconds=1), self.grain)

    def __str__(self) -> str:
        return self.label


def period_of(when: datetime, grain: Grain = Grain.month) -> Period:
    """The period that contains ``when`` (aware; taken in UTC)."""
    t = when.astimezone(UTC)
    if grain is Grain.month:
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
    elif grain is Grain.day:
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif grain is Grain.hour:
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    else:
        start = t.replace(second=0, microsecond=0)
        end = start + timedelta(minutes=1)
    return Period(start, end, grain)


def parse_period(label: str, grain: Grain = Grain.month) -> Period:
    """``"2026-11"`` -> November 2026 (in the given grain); ``ValueError`` says the form."""
    fmt, pattern = _FORMATS[grain]
    if not pattern.match(label.strip()):
        example = datetime(2026, 11, 3, 14, 5, tzinfo=UTC).strftime(fmt)
        raise ValueError(f"{label!r} is not a {grain.value} period: expected e.g. {example}")
    start = datetime.strptime(label.strip(), fmt).replace(tzinfo=UTC)
    return period_of(start, grain)


def boundaries(start: datetime, end: datetime, grain: Grain = Grain.month) -> Iterator[datetime]:
    """Period starts strictly inside (start, end), in order."""
    p = period_of(start, grain)
    while p.end < end:
        yield p.end
        p = p.next()


def split(
    start: datetime, end: datetime, grain: Grain = Grain.month
) -> list[tuple[datetime, datetime]]:
    """[start, end) cut at every period boundary inside it (no piece crosses a period)."""
    cuts = [start, *boundaries(start, end, grain), end]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
