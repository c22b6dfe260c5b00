"""The server's clock as this agent estimates it: the agent's clock plus a smoothed offset.

Evidence windows are aligned to the server's clock, so a node whose clock is off still
sends windows that line up with every other node's and with the server's ledger.

Every answer from the server carries an HTTP ``Date`` header (RFC 9110, whole seconds).
With the request sent at agent time ``t0`` and the answer received at ``t1``, the server's
clock read somewhere in ``[D, D + 1)`` between the two, so one observation of the offset
is ``D + 0.5 - (t0 + t1) / 2``, good to within 0.5 s plus half the round trip. Answers that
took longer than ``max_round_trip_s`` are ignored (too vague). Observations are smoothed
(exponential average); the first is taken as it is, and so is one further than
``step_s`` from the estimate: the agent's clock was stepped (NTP, an operator), and
averaging would take minutes to follow it.

The offset is ``server - agent``: positive when the agent's clock is behind. A warning is
logged when it passes ``warn_s`` (5 s) and when it comes back within it, not at every
heartbeat. (The server also sees each heartbeat's ``sent_at`` and shows the skew it
computes; that is its own estimate, not this one.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

log = logging.getLogger(__name__)


class ServerClock:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        offset_s: float | None = None,
        alpha: float = 0.2,
        step_s: float = 10.0,
        warn_s: float = 5.0,
        max_round_trip_s: float = 5.0,
    ) -> None:
        self.clock = clock
        self.offset_s = offset_s  # None until the server has answered once
        self.alpha = alpha
        self.step_s = step_s
        self.warn_s = warn_s
        self.max_round_trip_s = max_round_trip_s
        self._warned = False

    def now_s(self) -> float:
        """The server's time now, as far as the agent knows (its own clock until the first
        observation)."""
        return self.clock() + (self.offset_s or 0.0)

    def observe(self, sent_s: float, received_s: float, date_header: str | None) -> None:
        """Fold in one exchange: sent and received on the agent's clock, the answer's
        ``Date`` header as it came (ignored when missing or unreadable)."""
        if not date_header or not 0 <= received_s - sent_s <= self.max_round_trip_s:
            return
        try:
            server_s = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError):
            return
        sample = server_s + 0.5 - (sent_s + received_s) / 2
        if self.offset_s is None or abs(sample - self.offset_s) > self.step_s:
            self.offset_s = sample
        else:
            self.offset_s += self.alpha * (sample - self.offset_s)
        self._report()

    def _report(self) -> None:
        assert self.offset_s is not None
        off = abs(self.offset_s) > self.warn_s
        if off and not self._warned:
            log.warning(
                "this host's clock is %+.1f s off the server's (server minus host): evidence "
                "windows are aligned to the server's clock, but check NTP on this host",
                self.offset_s,
            )
        elif not off and self._warned:
            log.info("this host's clock is within %.0f s of the server's again", self.warn_s)
        self._warned = off
