"""Exact conversions of integer GPU-seconds for display (never floats)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal


def hours(seconds: int) -> str:
    """GPU-seconds as GPU-hours, an exact decimal rounded half-even to 4 places."""
    return str((Decimal(seconds) / Decimal(3600)).quantize(Decimal("0.0001"), ROUND_HALF_EVEN))
