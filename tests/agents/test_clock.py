"""The server's clock as the agent estimates it from HTTP Date headers."""

from __future__ import annotations

import logging
from email.utils import formatdate

import pytest

from agents.clock import ServerClock

T = 1_800_000_000.0  # the agent's clock when the exchanges below were sent


def date(server_s: float) -> str:
    return formatdate(server_s, usegmt=True)  # whole seconds, as servers send it


@pytest.mark.parametrize(
    ("name", "exchanges", "want"),
    [
        ("the first answer is taken as it is", [(T, T + 0.2, date(T + 7.1))], 7.4),
        (
            "later answers are averaged in (a fifth each)",
            [(T, T, date(T + 2)), (T, T, date(T + 3))],
            2.5 + 0.2 * 1.0,
        ),
        (
            "an answer far from the estimate is a clock step, taken at once",
            [(T, T, date(T + 2)), (T, T, date(T - 40))],
            -39.5,
        ),
        (
            "an answer that took too long to come is ignored",
            [(T, T, date(T + 2)), (T, T + 9, date(T + 30))],
            2.5,
        ),
        ("a missing Date header tells nothing", [(T, T, None)], None),
        ("an unreadable Date header tells nothing", [(T, T, "yesterday-ish")], None),
    ],
)
def test_the_offset_follows_the_server_dates(
    name: str, exchanges: list[tuple[float, float, str | None]], want: float | None
) -> None:
    clock = ServerClock(clock=lambda: T)
    for sent, received, header in exchanges:
        clock.observe(sent, received, header)
    if want is None:
        assert clock.offset_s is None and clock.now_s() == T
    else:
        assert clock.offset_s == pytest.approx(want, abs=1e-6)
        assert clock.now_s() == pytest.approx(T + want, abs=1e-6)


def test_a_skew_over_five_seconds_is_logged_once_and_its_end_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ServerClock(clock=lambda: T, step_s=1)
    with caplog.at_level(logging.INFO, logger="agents.clock"):
        for off in (8, 8, 9, 1):
            clock.observe(T, T, date(T + off))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "this host's clock is +8.5 s off the server's" in lines[0]
    assert "within 5 s of the server's again" in lines[1]
