"""Heartbeats at fleet scale: group commit.

Twenty thousand nodes reporting every 4 s is 5,000 heartbeats a second. One transaction
per heartbeat (a few statements each, and a connection from the pool held by a request
thread for all of it) tops out near a hundred a second on a small server. Here every
heartbeat request is queued and answered when the batch it joined has committed:

- a writer thread takes whatever is queued (up to ``max_batch``; it waits ``max_wait_s``
  at most for more once one arrived) and records the whole batch in **one transaction**
  with a fixed number of statements (``scheduler.services.nodes.heartbeat_many``): the
  nodes, their GPUs, the evidence windows, then the answers;
- a request is answered only after its batch committed, so a 200 still means "durable":
  an agent deletes the evidence it sent only then, and a crash loses no heartbeat that was
  acknowledged. Liveness in the database is at most one batch behind; the lost-node rule
  (tens of seconds) and the ledger (metered to the last *stored* heartbeat) are unchanged,
  so a crash loses no GPU-second either;
- one refused heartbeat (an unknown node, another provider's token, a GPU the node does not
  have) gets its own 4xx and does not fail the batch; a batch that fails as a whole (the
  database went away) fails each of its requests with a 503, and the agents retry;
- tokens are checked against a small in-memory cache (``auth_cache_s``, 10 s by default),
  so a revoked token keeps heartbeating for at most that long; every other route checks
  the database on each request.

Batches are written one at a time, so on SQLite (one writer) heartbeats never contend with
each other, and on PostgreSQL with several replicas each replica batches its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.engine import Engine

from scheduler.db.engine import session_scope
from scheduler.db.types import utcnow
from scheduler.domain.periods import Grain
from scheduler.errors import AndromedaError, Unauthenticated, Unavailable
from scheduler.schemas import Heartbeat, NodePublic
from scheduler.services.nodes import HeartbeatItem, heartbeat_many
from scheduler.services.tokens import Principal, authenticate, hash_token

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    item: HeartbeatItem
    future: asyncio.Future[NodePublic]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class BatchStats:
    """What the writer did, for benchmarks and ``/healthz``-style introspection."""

    batches: int = 0
    heartbeats: int = 0
    largest: int = 0
    failed_batches: int = 0
    write_s: float = 0.0
    sizes: list[int] = field(default_factory=list)


class HeartbeatBatcher:
    """Queues heartbeats and records them in batches, one transaction per batch."""

    def __init__(
        self,
        engine: Engine,
        *,
        grain: Grain,
        max_batch: int = 1000,
        max_wait_s: float = 0.005,
        auth_cache_s: float = 10.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.grain = grain
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.auth_cache_s = auth_cache_s
        self.clock = clock
        self.stats = BatchStats()
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tokens: dict[str, tuple[float, Principal]] = {}

    # --- the request side (event loop) ------------------------------------------------------
    async def principal(self, secret: str | None) -> Principal:
        """The token's principal, from the cache or (on a miss) the database."""
        if not secret:
            raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
        key = hash_token(secret)
        hit = self._tokens.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        principal = await asyncio.to_thread(self._authenticate, secret)
        if len(self._tokens) > 10_000:
            self._tokens.clear()
        self._tokens[key] = (time.monotonic() + self.auth_cache_s, principal)
        return principal

    def _authenticate(self, secret: str) -> Principal:
        with session_scope(self.engine) as session:
            return authenticate(session, secret=secret)

    async def submit(self, name: str, principal: Principal, body: Heartbeat) -> NodePublic:
        """Queue one heartbeat; returns its node once the batch it joined has committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[NodePublic] = loop.create_future()
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down: retry against another replica")
            item = HeartbeatItem(name, principal, body, received_at=self.clock())
            self._queue.append(_Pending(item, future, loop))
            self._cond.notify()
        return await future

    # --- the writer thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _take(self) -> list[_Pending]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return []
            # Once one heartbeat is here, give the others a moment to join its batch.
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return  # stopping, and nothing left
            self._write(batch)

    def _write(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            with session_scope(self.engine) as session:
                answers: list[NodePublic | AndromedaError] = heartbeat_many(
                    session, [p.item for p in batch], now=self.clock(), grain=self.grain
                )
        except Exception as exc:  # the batch as a whole: each request gets a 503
            log.warning("a batch of %d heartbeats could not be written: %s", len(batch), exc)
            self.stats.failed_batches += 1
            error = Unavailable(f"heartbeat not recorded ({type(exc).__name__}): retry")
            answers = [error] * len(batch)
        self.stats.batches += 1
        self.stats.heartbeats += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        self.stats.write_s += time.perf_counter() - started
        for pending, answer in zip(batch, answers, strict=True):
            pending.loop.call_soon_threadsafe(_settle, pending.future, answer)


def _settle(future: asyncio.Future[NodePublic], answer: NodePublic | AndromedaError) -> None:
    if future.done():  # the client went away
        return
    if isinstance(answer, AndromedaError):
        future.set_exception(answer)
    else:
        future.set_result(answer)
