"""Exact money: integer micro-units of the settlement currency, never floats.

A micro-unit is 10^-6 of the currency (a millionth of a dollar): fine enough for a provider's
share of a single $0.01 API call (10% of it is 1,000 micros). Amounts are parsed from decimal
text, never from binary floats; a split of a pool across providers always sums exactly to the
pool (``split_largest_remainder``). Payments are in the currency's minor unit (cents); what
a statement total has below a cent is carried to the next statement, never lost or invented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal, InvalidOperation
from fractions import Fraction

MICROS = 1_000_000
MINOR_UNIT_MICROS = 10_000  # a cent


def parse_amount(text: str | int | Decimal) -> int:
    """``"12.34"`` -> 12_340_000 micros. Refuses floats, more than 6 decimals, NaN and inf."""
    if isinstance(text, bool | float):
        raise ValueError('amounts are decimal text ("12.34"), never binary floats')
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not an amount: use decimal text such as 12.34") from None
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a finite amount")
    micros = value * MICROS
    if micros != micros.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 decimal places")
    return int(micros)


def format_amount(micros: int, currency: str = "USD", *, places: int = 6) -> str:
    """12_340_000 -> ``"12.340000 USD"`` (``places`` 2 for cents)."""
    quantum = Decimal(1).scaleb(-places)
    value = (Decimal(micros) / MICROS).quantize(quantum, ROUND_HALF_EVEN)
    return f"{value} {currency}"


def round_to_minor_unit(micros: int) -> int:
    """Down to a whole cent (what can be paid); the rest is carried, never rounded up."""
    return int((Decimal(micros) / MINOR_UNIT_MICROS).to_integral_value(ROUND_DOWN)) * (
        MINOR_UNIT_MICROS
    )


def apply_rate(amount_micros: int, rate: Fraction) -> Fraction:
    """The exact share ``rate`` x ``amount`` (a fraction of a micro is kept exact)."""
    return Fraction(amount_micros) * rate


def split_largest_remainder(pool: int, weights: Mapping[int, Fraction | int]) -> dict[int, int]:
    """Split the integer ``pool`` in proportion to ``weights``; the parts sum to ``pool``.

    Each key gets the floor of its exact share; the units left over go one each to the
    largest remainders, ties broken by the smaller key (so the result is deterministic).
    Keys with zero weight get nothing; with no positive weight at all, nothing is split.
    """
    if pool < 0:
        raise ValueError("a pool cannot be negative")
    positive = {k: Fraction(w) for k, w in weights.items() if w > 0}
    total = sum(positive.values(), Fraction(0))
    if not positive or pool == 0:
        return {k: 0 for k in weights}
    exact = {k: pool * w / total for k, w in positive.items()}
    parts = {k: int(v) for k, v in exact.items()}  # floors: v >= 0
    left = pool - sum(parts.values())
    order: Sequence[int] = sorted(positive, key=lambda k: (-(exact[k] - parts[k]), k))
    for k in order[:left]:
        parts[k] += 1
    return {k: parts.get(k, 0) for k in weights}


def round_pool(exact: Fraction) -> int:
    """An exact pool in micros rounded half-even to a whole micro (documented rule)."""
    floor = exact.numerator // exact.denominator
    rest = exact - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1):
        return floor + 1
    return floor
