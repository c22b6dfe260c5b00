"""Wakes the long polls of sites whose assignments changed.

Long polls (``GET /v1/sites/{name}/assignments?wait=...``) run on the server's event loop;
changes are made by the scheduler thread and by request handlers in worker threads.
``notify`` may be called from any thread. A waiter takes its event *before* reading the
database, so a change made between that read and its wait still wakes it. Each waiter also
re-reads the database at least every ``recheck_s``, which covers changes made by another
server process on the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable


class SiteNotifier:
    def __init__(self, recheck_s: float = 1.0) -> None:
        self.recheck_s = recheck_s
        self.closing = False  # the server is shutting down: long polls answer at once
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[int, asyncio.Event] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def event(self, site_id: int) -> asyncio.Event:
        """The event the next change of ``site_id`` sets (call on the event loop)."""
        ev = self._events.get(site_id)
        if ev is None:
            ev = self._events[site_id] = asyncio.Event()
        return ev

    async def wait(self, event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), min(timeout_s, self.recheck_s))

    def notify(self, site_ids: Iterable[int]) -> None:
        """Wake every waiter of these sites; safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        ids = list(site_ids)
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._fire, ids)

    def close(self) -> None:
        """Answer every long poll now and every later one at once (safe from any thread):
        a server shutting down must not wait for them."""
        self.closing = True
        self.notify(list(self._events))

    def _fire(self, site_ids: list[int]) -> None:
        for site_id in site_ids:
            ev = self._events.pop(site_id, None)
            if ev is not None:
                ev.set()


class Changes:
    """What a request handler announces once its transaction has committed (it hands these
    to FastAPI's background tasks, which run after the response, so after the commit):
    sites whose assignments changed, and that a scheduling cycle is worth running now."""

    def __init__(self, notifier: SiteNotifier) -> None:
        self.notifier = notifier
        self.wake_scheduler: Callable[[], None] = lambda: None

    def sites(self, site_ids: Iterable[int]) -> None:
        self.notifier.notify(site_ids)

    def schedule(self) -> None:
        self.wake_scheduler()
