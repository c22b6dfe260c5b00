"""Two replicas, one leader: the scheduler lease, and the fence every loop write passes.

Any number of ``andromeda server`` processes may serve one PostgreSQL database; exactly one
of them runs the scheduling loop at a time. Which one is a row of ``scheduler_lease``:

- ``holder``: the process holding the lease, ``hostname:pid:random``;
- ``epoch``: one more at every acquisition; the fencing token;
- ``acquired_at``, ``renewed_at``, ``expires_at``: by the database's clock.

**Acquire and renew.** Each attempt is one short transaction: the row is created if missing,
read ``FOR UPDATE``, and then renewed if it is ours (same holder, same epoch, unexpired),
taken with the next epoch if its lease has expired or was released, or left alone. The
leader renews every ``renew_s``; a standby tries every ``renew_s``, or just after the lease it
saw expires if that is sooner. A leader that dies is replaced ``ttl_s`` after its last
renewal at the latest (plus the standby's wait for its next try); one that stops with
SIGTERM releases the lease and is replaced at the standby's next try.

**Why the database's clock.** Expiry is judged by the clock that wrote it: the database's
``clock_timestamp()``, read in the same transaction after the row lock is granted. Replicas
may disagree about the time (drift, a step of NTP, a VM paused and resumed) without two of
them ever believing they hold the lease. A replica's own monotonic clock only paces its
attempts; it never decides who leads. On SQLite every process is on one host, whose clock
is the database's.

**Why a lease row and not an advisory lock.** A PostgreSQL session advisory lock lives as
long as its connection, and a stopped process's connection stays up (its kernel still
answers TCP): a leader stopped with SIGSTOP would keep the lock, and the loop, forever.
The lock also holds on one connection while the loop writes through others from the pool,
so it fences none of those writes. The lease expires by itself, carries a token every
write checks, works the same on SQLite, and is a row anyone can read (``GET
/v1/admin/leader``).

**The fence.** Every transaction the loop writes in (``Scheduler._transaction``: lost
nodes, requeues, timeouts, reclaims, the ledger tick, placements, preemptions, pending
reasons) begins with ``fence()``: it reads the lease row ``FOR SHARE`` and goes on only if
the row still names this holder and epoch and has not expired; otherwise it raises
``LeaseLost``, the transaction is rolled back and the loop stands by. The argument:

1. The share lock is held until the transaction ends. A takeover updates the row, for
   which it needs ``FOR UPDATE``, which waits for every share lock. So a takeover commits
   either before the fence reads the row (the fence then sees the new epoch, or the expiry,
   and refuses) or after the fenced transaction has committed or rolled back.
2. Hence every committed loop write lies wholly inside one epoch, made by that epoch's
   holder: after the new epoch is committed no write of an older one can commit.
3. A leader paused *between* transactions (GC, SIGSTOP) fails its next fence: the lease
   has expired or moved on (usually its renewal, due by then, is refused first: the loop
   renews before a write transaction when a renewal is due, so that a long cycle keeps its
   lease, and never takes a new term in the middle of a cycle). A leader paused *inside*
   a transaction keeps its share lock, so the takeover waits; PostgreSQL ends that
   session once it has been idle in its transaction for ``ttl_s``
   (``idle_in_transaction_session_timeout``, set by the fence for the transaction), which
   rolls it back and frees the lock. When the paused process
   resumes, its next statement or its commit fails. A pause costs takeover time, never a
   double write.

On SQLite ``BEGIN IMMEDIATE`` (``scheduler/db/engine.py``) takes the database's write lock
before the fence reads, and holds it until the transaction ends, so the same argument holds
with the database lock in place of the row lock. SQLite is for one server process, though:
a second server with its loop on refuses to start (``claim_alone``) while another live
process holds the lease; a holder on this host whose process is gone is replaced at once,
so a restart after ``kill -9`` does not wait for the lease to expire.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from scheduler.db.engine import lock_for_update, session_scope
from scheduler.db.models import SchedulerLease
from scheduler.db.types import utcnow

log = logging.getLogger(__name__)

LOOP = "scheduler"  # the lease's name: one loop per database


class LeaseLost(Exception):
    """This process does not (or no longer) hold the scheduler lease; the loop's write was
    refused and rolled back."""


class LeaseHeld(Exception):
    """Another live server holds the lease of a database only one server may use."""


@dataclass(frozen=True)
class LeaseState:
    """The lease row as read, and the database's clock when it was read."""

    name: str
    holder: str
    epoch: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    now: datetime

    @property
    def live(self) -> bool:
        return bool(self.holder) and self.expires_at > self.now

    @property
    def expires_in_s(self) -> float:
        return (self.expires_at - self.now).total_seconds()


def holder_id() -> str:
    """``hostname:pid:random``: unique per process and per start, even with a reused pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def db_now(session: Session) -> datetime:
    """The database's clock, now (not at the transaction's start), in aware UTC."""
    if session.get_bind().dialect.name == "postgresql":
        value = session.execute(text("SELECT clock_timestamp()")).scalar_one()
        assert isinstance(value, datetime) and value.tzinfo is not None
        return value.astimezone(UTC)
    return utcnow()  # SQLite: one host, whose clock is the database's


def read_lease(session: Session, name: str = LOOP) -> LeaseState | None:
    """The lease as it stands (no lock), or None when no server ever tried to take it."""
    row = session.get(SchedulerLease, name)
    if row is None:
        return None
    return _state(row, db_now(session))


class LeaderLease:
    """One process's side of the lease. ``hold`` and ``fence`` are called by the loop's
    thread only; ``leading``, ``epoch`` and ``last_seen`` may be read from any thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        ttl_s: float,
        renew_s: float,
        name: str = LOOP,
        holder: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if renew_s * 2 > ttl_s:
            raise ValueError(f"renew_s ({renew_s}) must be at most half of ttl_s ({ttl_s})")
        self.engine = engine
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.name = name
        self.holder = holder or holder_id()
        self.monotonic = monotonic  # paces renewals and tries only; never judges expiry
        self.last_seen: LeaseState | None = None  # the row at our latest attempt
        self.leading_since: datetime | None = None  # database clock
        self._epoch: int | None = None  # the epoch we hold; None: standing by
        self._renew_at = 0.0  # monotonic: when to renew next
        self._retry_at = 0.0  # monotonic: when a standby tries next
        self._told_held: tuple[str, int] | None = None  # the holder we last said we wait on

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def leading(self) -> bool:
        return self._epoch is not None

    # --- acquire, renew, release ------------------------------------------------------------
    def hold(self) -> bool:
        """Renew the lease when due, or try to take it when a try is due; whether this
        process leads now. A database error steps down: the next try takes a new epoch."""
        return self._hold(take=True)

    def keep(self) -> bool:
        """Renew the lease when due but never take it (in the middle of a cycle, a new
        term must not begin); whether this process still leads."""
        return self._epoch is not None and self._hold(take=False)

    def _hold(self, *, take: bool) -> bool:
        clock = self.monotonic()
        if self._epoch is not None and clock < self._renew_at:
            return True
        if self._epoch is None and clock < self._retry_at:
            return False
        try:
            self._attempt(take=take)
        except DBAPIError as exc:
            if self._epoch is not None:
                self._step_down(f"it could not be renewed ({exc.orig})")
            else:
                log.debug("scheduler lease: no try possible now (%s)", exc.orig)
            self._retry_at = self.monotonic() + self.renew_s
        return self._epoch is not None

    def renew_in_s(self) -> float:
        """Seconds until the leader's next renewal is due."""
        return max(0.0, self._renew_at - self.monotonic())

    def retry_in_s(self) -> float:
        """Seconds until a standby's next try is due."""
        return max(0.0, self._retry_at - self.monotonic())

    def release(self) -> None:
        """Give the lease up (a clean shutdown): it expires now, so that a standby takes
        over at its next try. Only our own epoch is released."""
        epoch, self._epoch = self._epoch, None
        if epoch is None:
            return
        try:
            with session_scope(self.engine) as session:
                row = self._locked_row(session)
                if row is not None and row.holder == self.holder and row.epoch == epoch:
                    row.expires_at = db_now(session)
                    session.add(row)
        except DBAPIError as exc:
            log.warning("scheduler lease: not released (%s); it expires by itself", exc.orig)
            return
        log.info("scheduler lease released (epoch %s); a standby server may take over", epoch)

    def claim_alone(self) -> None:
        """For a database only one server may use (SQLite): take the lease now, or raise
        ``LeaseHeld`` when another live process holds it. A holder that renews while we
        wait is alive; one whose lease expires meanwhile is not. Waits at most one lease."""
        deadline = time.monotonic() + self.ttl_s + self.renew_s
        first: LeaseState | None = None
        while True:
            self._retry_at = 0.0
            self._told_held = ("", -1)  # this server does not stand by: it waits, or refuses
            if self.hold():
                return
            seen = self.last_seen
            if seen is not None and seen.live:
                if first is None:
                    first = seen
                elif (seen.holder, seen.epoch, seen.renewed_at) != (
                    first.holder,
                    first.epoch,
                    first.renewed_at,
                ):
                    raise LeaseHeld(_held_message(seen))
            if time.monotonic() > deadline:
                raise LeaseHeld(_held_message(seen) if seen else "the lease could not be taken")
            time.sleep(min(0.2, self.renew_s))

    # --- the fence ----------------------------------------------------------------------------
    def fence(self, session: Session) -> None:
        """The first statement of every loop write: go on only while this process holds the
        lease, and keep it from being taken until ``session``'s transaction ends (see the
        module docstring). Raises ``LeaseLost`` otherwise."""
        epoch = self._epoch
        if epoch is None:
            raise LeaseLost("this server does not hold the scheduler lease")
        postgres = session.get_bind().dialect.name == "postgresql"
        stmt = select(
            col(SchedulerLease.holder), col(SchedulerLease.epoch), col(SchedulerLease.expires_at)
        ).where(col(SchedulerLease.name) == self.name)
        if postgres:
            stmt = stmt.with_for_update(read=True)  # FOR SHARE
        row = session.exec(stmt).first()
        if postgres:
            now = session.execute(
                text(
                    "SELECT clock_timestamp(), "
                    "set_config('idle_in_transaction_session_timeout', :ms, true)"
                ),
                {"ms": str(int(self.ttl_s * 1000))},
            ).one()[0]
            now = now.astimezone(UTC)
        else:
            now = utcnow()
        if row is None:
            reason = "the lease row is gone"
        elif (row[0], row[1]) != (self.holder, epoch):
            reason = f"{row[0] or 'nobody'} holds it at epoch {row[1]}"
        elif row[2] <= now:
            reason = f"it expired {(now - row[2]).total_seconds():.1f}s ago"
        else:
            return
        self._step_down(reason)
        raise LeaseLost(f"the scheduler lease of epoch {epoch} is lost: {reason}")

    # --- inside ---------------------------------------------------------------------------------
    def _attempt(self, *, take: bool) -> None:
        """One short transaction: renew ours, take an expired or released lease (when
        ``take``), or note who holds it."""
        started = self.monotonic()
        with session_scope(self.engine) as session:
            postgres = session.get_bind().dialect.name == "postgresql"
            if postgres:
                # A lock held by a paused leader must not hang this try, and this
                # transaction, paused, must not hold the row for longer than a lease.
                session.execute(
                    text(
                        "SELECT set_config('lock_timeout', :lock_ms, true), "
                        "set_config('idle_in_transaction_session_timeout', :idle_ms, true)"
                    ),
                    {
                        "lock_ms": str(int(self.renew_s * 1000)),
                        "idle_ms": str(int(self.ttl_s * 1000)),
                    },
                )
            row = self._locked_row(session)
            if row is None:  # the first try ever on this database
                self._insert_row(session, postgres=postgres)
                row = self._locked_row(session)
                assert row is not None
            now = db_now(session)
            expiry = now + timedelta(seconds=self.ttl_s)
            ours = row.holder == self.holder and row.epoch == self._epoch
            if ours and row.expires_at > now:
                row.renewed_at, row.expires_at = now, expiry
                session.add(row)
                self.last_seen = _state(row, now)
                self._renew_at = started + self.renew_s
                return
            before = _state(row, now)
            if ours:
                self._step_down(f"it expired {-before.expires_in_s:.1f}s ago")
            elif self._epoch is not None:  # taken while we were not looking
                self._step_down(f"{row.holder or 'nobody'} holds it at epoch {row.epoch}")
            if not take or not (
                not before.live
                or row.holder == self.holder  # our own earlier term, which we stepped down from
                or (not postgres and _gone_from_this_host(row.holder))
            ):
                self._standby(before)
                return
            row.holder, row.epoch = self.holder, row.epoch + 1
            row.acquired_at = row.renewed_at = now
            row.expires_at = expiry
            session.add(row)
            state = _state(row, now)
        # committed: only now do we lead
        self._epoch, self.last_seen, self.leading_since = state.epoch, state, state.acquired_at
        self._renew_at = started + self.renew_s
        self._told_held = None
        log.info(
            "scheduler lease: this server (%s) leads now, epoch %s%s",
            self.holder,
            state.epoch,
            self._taken_from(before),
        )

    def _taken_from(self, before: LeaseState) -> str:
        if not before.holder:
            return ""
        if before.holder == self.holder:
            return " (again: its previous term had lapsed)"
        if before.live:
            return f"; took over from {before.holder}, whose process is gone from this host"
        ago = -before.expires_in_s
        return f"; took over from {before.holder}, whose lease expired {ago:.1f}s ago"

    def _standby(self, seen: LeaseState) -> None:
        self.last_seen = seen
        # try again just after the lease we saw expires, or at the next try if sooner
        wait = min(self.renew_s, max(0.05, seen.expires_in_s + 0.05))
        self._retry_at = self.monotonic() + wait
        if self._told_held not in ((seen.holder, seen.epoch), ("", -1)):
            self._told_held = (seen.holder, seen.epoch)
            log.info(
                "scheduler lease: %s leads (epoch %s, since %s); this server stands by",
                seen.holder,
                seen.epoch,
                seen.acquired_at.isoformat(timespec="seconds"),
            )

    def _step_down(self, reason: str) -> None:
        if self._epoch is None:
            return
        log.warning(
            "scheduler lease of epoch %s lost (%s); this server stops scheduling and stands by",
            self._epoch,
            reason,
        )
        self._epoch = None
        self.leading_since = None
        self._retry_at = 0.0  # try again at once: nobody may have taken it

    def _insert_row(self, session: Session, *, postgres: bool) -> None:
        """An expired lease nobody held; another server creating it meanwhile is fine."""
        never = datetime(1970, 1, 1, tzinfo=UTC)
        values = {
            "name": self.name,
            "holder": "",
            "epoch": 0,
            "acquired_at": never,
            "renewed_at": never,
            "expires_at": never,
        }
        insert = postgresql.insert if postgres else sqlite.insert
        table = SchedulerLease.__table__  # type: ignore[attr-defined]
        session.execute(insert(table).values(**values).on_conflict_do_nothing())

    def _locked_row(self, session: Session) -> SchedulerLease | None:
        """The lease row, ``FOR UPDATE`` on PostgreSQL (on SQLite the transaction holds the
        database's write lock already)."""
        stmt = select(SchedulerLease).where(col(SchedulerLease.name) == self.name)
        return session.exec(lock_for_update(stmt, session)).first()


def _state(row: SchedulerLease, now: datetime) -> LeaseState:
    return LeaseState(
        name=row.name,
        holder=row.holder,
        epoch=row.epoch,
        acquired_at=row.acquired_at,
        renewed_at=row.renewed_at,
        expires_at=row.expires_at,
        now=now,
    )


def _held_message(seen: LeaseState) -> str:
    ago = (seen.now - seen.renewed_at).total_seconds()
    return (
        f"another andromeda server ({seen.holder}) runs the scheduler on this SQLite "
        f"database: it renewed its lease {ago:.1f}s ago (epoch {seen.epoch}). SQLite serves "
        "one server process: stop the other one, start this one with --no-scheduler to "
        "serve the API only, or use PostgreSQL to run two replicas"
    )


def _gone_from_this_host(holder: str) -> bool:
    """Whether ``holder`` (``hostname:pid:random``) was a process of this host that no longer
    runs. Unknown means no: the lease is then left to expire."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # another lease object of this very process: alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child its parent has not reaped yet is a zombie: gone all the same
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False
