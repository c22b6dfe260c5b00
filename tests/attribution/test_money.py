"""Exact money and periods: the pure parts of attribution, property-tested."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.attribution.policy import DEFAULT_POLICY
from scheduler.domain.money import (
    format_amount,
    parse_amount,
    round_pool,
    round_to_minor_unit,
    split_largest_remainder,
)
from scheduler.domain.periods import Grain, parse_period, period_of, split

weights = st.dictionaries(
    st.integers(min_value=1, max_value=10_000),
    st.fractions(min_value=0, max_value=10**6, max_denominator=10**4),
    min_size=1,
    max_size=40,
)


@given(pool=st.integers(min_value=0, max_value=10**15), weights=weights)
def test_a_split_always_sums_exactly_to_its_pool(pool: int, weights: dict[int, Fraction]) -> None:
    parts = split_largest_remainder(pool, weights)
    assert set(parts) == set(weights)
    total = sum(w for w in weights.values() if w > 0)
    if total == 0:
        assert all(v == 0 for v in parts.values())
        return
    assert sum(parts.values()) == pool
    for key, w in weights.items():
        exact = Fraction(pool) * w / total if w > 0 else Fraction(0)
        assert exact - 1 < parts[key] < exact + 1  # never more than a unit from its share
        assert parts[key] >= 0


@given(pool=st.integers(min_value=0, max_value=10**12), weights=weights)
def test_a_split_does_not_depend_on_the_order_of_its_weights(pool, weights) -> None:  # type: ignore[no-untyped-def]
    reordered = dict(reversed(list(weights.items())))
    assert split_largest_remainder(pool, weights) == split_largest_remainder(pool, reordered)


def test_largest_remainder_ties_go_to_the_smaller_key() -> None:
    assert split_largest_remainder(1, {7: 1, 3: 1}) == {7: 0, 3: 1}
    assert split_largest_remainder(2, {1: 1, 2: 1, 3: 1}) == {1: 1, 2: 1, 3: 0}


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("12.34", 12_340_000),
        ("0.001", 1_000),
        ("7", 7_000_000),
        ("0.000001", 1),
        ("-2.5", -2_500_000),
    ],
)
def test_amounts_are_parsed_exactly(text: str, micros: int) -> None:
    assert parse_amount(text) == micros


@pytest.mark.parametrize("bad", ["1.0000001", "abc", "NaN", "inf", 1.5])
def test_amounts_that_are_not_exact_decimals_are_refused(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        parse_amount(bad)


def test_money_formats_and_rounds_down_to_what_can_be_paid() -> None:
    assert format_amount(70_580_671) == "70.580671 USD"
    assert format_amount(70_580_671, places=2) == "70.58 USD"
    assert round_to_minor_unit(70_580_671) == 70_580_000
    assert round_pool(Fraction(5, 2)) == 2 and round_pool(Fraction(7, 2)) == 4  # half-even
    assert round_pool(Fraction(26, 10)) == 3


_SPAN = {Grain.month: 400 * 86400, Grain.day: 40 * 86400, Grain.hour: 3 * 86400, Grain.minute: 7200}


@given(
    start=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ),
    grain=st.sampled_from(list(Grain)),
    data=st.data(),
)
def test_pieces_cut_at_period_boundaries_cover_the_interval_and_never_cross_a_period(
    start: datetime, grain: Grain, data: st.DataObject
) -> None:
    seconds = data.draw(st.integers(min_value=1, max_value=_SPAN[grain]))
    end = start + timedelta(seconds=seconds)
    pieces = split(start, end, grain)
    assert pieces[0][0] == start and pieces[-1][1] == end
    for (_, b), (c, _) in zip(pieces, pieces[1:], strict=False):
        assert b == c
    for a, b in pieces:
        assert period_of(a, grain) == period_of(b - timedelta(microseconds=1), grain)


def test_periods_by_label_and_grain() -> None:
    nov = parse_period("2026-11")
    assert nov.start == datetime(2026, 11, 1, tzinfo=UTC) and nov.end == datetime(
        2026, 12, 1, tzinfo=UTC
    )
    assert nov.next().label == "2026-12" and nov.previous().label == "2026-10"
    assert parse_period("2026-11-03T14:05", Grain.minute).end == datetime(
        2026, 11, 3, 14, 6, tzinfo=UTC
    )
    with pytest.raises(ValueError, match="expected e.g. 2026-11"):
        parse_period("November")


def test_the_default_policy_is_the_reward_matrix() -> None:
    p = DEFAULT_POLICY
    assert p.rate("api_usage") == Fraction(1, 10) and p.rate("subscription") == Fraction(1, 20)
    assert p.rate("upgrade") == 2 and p.rate("licence") == Fraction(7, 100)
    assert p.rate("consulting") == Fraction(1, 20) and p.rate("dedicated_capacity") == Fraction(
        1, 5
    )
    assert (p.rate("custom_dev_min"), p.rate("custom_dev_max")) == (
        Fraction(1, 20),
        Fraction(1, 10),
    )
    assert p.gpu_weight("H200-141GB") > p.gpu_weight("H100-80GB") > p.gpu_weight("T4-16GB")
    assert p.rate("api_usage", {"api_usage": "0.12"}) == Fraction(3, 25)  # an agreement's own
