"""The fleet's shape, kept per server process for the submit-time check of a gang.

A submission is checked against what the fleet could ever host (``services/jobs.py``): the
GPU models it has, its largest matching node, its largest matching site. That follows from
a summary of a few rows per site: how many nodes of each site have how many GPUs of each
kind (model, memory). The database computes it in one query over the GPUs; a server
process keeps it and computes it again when it is older than ``MAX_AGE_S``, so that a
submission costs the same whatever the size of the fleet.

Freshness, and why a kept summary is safe:

- **A refusal is always against fresh data.** Before a job is refused, the summary is
  computed again unless the one at hand was begun after the submission was: a node that
  registered a second ago (through another server process, say) never causes a wrong 422.
- **An acceptance on a summary up to ``MAX_AGE_S`` old is harmless**: the scheduler checks
  the fleet again at placement and leaves a job it cannot place pending, with a reason.
- **Single flight**: one refresh at a time per process and database; submissions that need
  one meanwhile wait for it rather than each running the query.
- A change to the fleet's shape committed **by this process** through the ORM (a node
  registering, its GPUs changing model or memory, a node moving site) makes the next
  submission compute the summary again; a session that holds such a change uncommitted
  checks against its own view of the fleet, computed for it alone and not kept.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, object_session
from sqlmodel import col, func, select

from scheduler.db.models import Gpu, Node
from scheduler.errors import ValidationFailed

MAX_AGE_S = 5.0
"""A kept summary older than this is computed again at the next submission."""

Row = tuple[int, str, int, int, int]
"""(site id, GPU model, GPU memory bytes, GPUs of that kind on one node, nodes with that many)"""


@dataclass(frozen=True, slots=True)
class FleetSummary:
    rows: tuple[Row, ...]
    models: tuple[str, ...]  # the GPU models of the fleet, sorted
    kinds: tuple[tuple[str, int], ...]  # the (model, memory) pairs of the fleet
    serial: int  # refreshes are numbered as they begin (see FleetCache.mark)
    built_at: float  # the cache's clock when its query began
    generation: int  # the cache's generation then


def summarise(session: Session) -> tuple[Row, ...]:
    """The fleet's shape, counted by the database in one pass over the GPUs: how many nodes
    of each site have how many GPUs of each kind. A few rows per site, not one per node."""
    per_node = (
        select(
            col(Node.site_id).label("site_id"),
            col(Gpu.model).label("model"),
            col(Gpu.memory_bytes).label("memory"),
            func.count(col(Gpu.id)).label("gpus"),
        )
        .join(Gpu, col(Gpu.node_id) == col(Node.id))
        .group_by(col(Node.id), col(Node.site_id), col(Gpu.model), col(Gpu.memory_bytes))
        .subquery("per_node")
    )
    shape = (per_node.c.site_id, per_node.c.model, per_node.c.memory, per_node.c.gpus)
    rows = session.execute(sa_select(*shape, func.count()).group_by(*shape)).all()
    return tuple((int(s), str(m), int(mem), int(g), int(n)) for s, m, mem, g, n in rows)


class FleetCache:
    """The kept summary of one database, in one process."""

    def __init__(
        self,
        *,
        max_age_s: float = MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        query: Callable[[Session], tuple[Row, ...]] = summarise,
    ) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        self.query = query
        self.generation = 0  # bumped by every commit here that changes the fleet's shape
        self.refreshes = 0  # summaries computed (kept or not)
        self._summary: FleetSummary | None = None
        self._refresh = threading.Lock()  # single flight
        self._counter = threading.Lock()

    def mark(self) -> int:
        """Where refreshes stand now: a summary with a higher ``serial`` was begun later."""
        return self.refreshes

    def invalidate(self) -> None:
        with self._counter:
            self.generation += 1

    def get(self, session: Session, *, after: int | None = None) -> FleetSummary:
        """The kept summary if it is recent enough, else a new one (computed in ``session``;
        concurrent callers wait for it). Recent enough: begun after ``mark()`` returned
        ``after``, or by default at most ``max_age_s`` ago and after the last change."""
        found = self._summary
        if found is not None and self._usable(found, after):
            return found
        # SQLite serialises transactions (each holds the write lock from its first
        # statement): two cannot run at once, and one waiting here for another that waits on
        # the database would deadlock until the busy timeout.
        if session.get_bind().dialect.name == "sqlite":
            return self._build(session)
        with self._refresh:
            found = self._summary
            if found is not None and self._usable(found, after):
                return found
            return self._build(session)

    def build_unkept(self, session: Session) -> FleetSummary:
        """A summary of what ``session`` sees (its own uncommitted changes too), not kept."""
        return self._build(session, keep=False)

    def _usable(self, summary: FleetSummary, after: int | None) -> bool:
        if summary.generation != self.generation:
            return False
        if after is not None:
            return summary.serial > after
        return self.clock() - summary.built_at < self.max_age_s

    def _build(self, session: Session, *, keep: bool = True) -> FleetSummary:
        with self._counter:
            self.refreshes += 1
            serial, generation = self.refreshes, self.generation
        built_at = self.clock()
        rows = self.query(session)
        summary = FleetSummary(
            rows=rows,
            models=tuple(sorted({model for _, model, _, _, _ in rows})),
            kinds=tuple(dict.fromkeys((model, memory) for _, model, memory, _, _ in rows)),
            serial=serial,
            built_at=built_at,
            generation=generation,
        )
        if keep:
            current = self._summary
            if current is None or current.serial < serial:
                self._summary = summary
        return summary


_caches: weakref.WeakKeyDictionary[Engine, FleetCache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def cache_of(engine: Engine) -> FleetCache:
    """The kept summary of ``engine``'s database in this process."""
    cache = _caches.get(engine)
    if cache is None:
        with _caches_lock:
            cache = _caches.get(engine)
            if cache is None:
                cache = _caches[engine] = FleetCache()
    return cache


def check(session: Session, refusal: Callable[[FleetSummary], ValidationFailed | None]) -> None:
    """Raise what ``refusal`` finds wrong against the fleet's summary. A kept summary does
    for an acceptance; a refusal is confirmed against one begun after this call was."""
    session.flush()  # pending changes of the fleet are this session's own (see below)
    bind = session.get_bind()
    if not isinstance(bind, Engine):  # a session on a connection: nothing to share
        error = refusal(FleetCache().build_unkept(session))
    else:
        cache = cache_of(bind)
        if _CHANGED in session.info:  # its own uncommitted nodes count, for it alone
            error = refusal(cache.build_unkept(session))
        else:
            mark = cache.mark()
            summary = cache.get(session)
            error = refusal(summary)
            if error is not None and summary.serial <= mark:
                error = refusal(cache.get(session, after=mark))
    if error is not None:
        raise error


# What this process changes in the fleet's shape, noticed as the ORM flushes it and applied
# when the transaction commits. (Core statements and other processes are covered by the
# summary's age.)
_CHANGED = "andromeda.fleet_changed"  # session.info key: the engines whose fleet it changed
_GPU_SHAPE = ("node_id", "model", "memory_bytes")
_NODE_SHAPE = ("site_id",)


def _note(connection: Any, target: object) -> None:
    session = object_session(target)
    if session is not None:
        session.info.setdefault(_CHANGED, set()).add(connection.engine)


def _gpu_written(_mapper: Any, connection: Any, target: Gpu) -> None:
    _note(connection, target)


def _gpu_updated(_mapper: Any, connection: Any, target: Gpu) -> None:
    attrs = inspect(target).attrs
    if any(attrs[name].history.has_changes() for name in _GPU_SHAPE):
        _note(connection, target)


def _node_updated(_mapper: Any, connection: Any, target: Node) -> None:
    attrs = inspect(target).attrs
    if any(attrs[name].history.has_changes() for name in _NODE_SHAPE):
        _note(connection, target)


def _committed(session: Session) -> None:
    engines = session.info.pop(_CHANGED, None)
    for engine in engines or ():
        cache = _caches.get(engine)
        if cache is not None:
            cache.invalidate()


event.listen(Gpu, "after_insert", _gpu_written)
event.listen(Gpu, "after_delete", _gpu_written)
event.listen(Gpu, "before_update", _gpu_updated)
event.listen(Node, "before_update", _node_updated)
event.listen(Session, "after_commit", _committed)
