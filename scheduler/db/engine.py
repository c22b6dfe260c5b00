"""Engines and sessions for SQLite (embedded default) and PostgreSQL.

One code path serves both databases. ``lock_for_update`` adds ``FOR UPDATE`` on PostgreSQL,
where concurrent writers exist, and is a no-op on SQLite, where the database serialises
writers itself (``BEGIN IMMEDIATE`` below takes the write lock up front so two writers never
deadlock upgrading a read lock). ``among`` is ``IN (ids)``, sent as one array parameter on
PostgreSQL however many ids there are.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import ColumnElement, Integer, Text, any_, bindparam, event
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.sql import Select
from sqlmodel import Session, create_engine

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Select[Any])


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and use the psycopg 3 driver for them."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True
        )
        _configure_sqlite(engine)
        return engine
    # More connections than request threads (AnyIO runs sync routes on 40), plus the
    # scheduler loop, the heartbeat writer and their lease/auth look-ups: a request thread
    # that holds a connection while waiting for another must never find the pool empty
    # with every thread waiting on it (that stalled 30+ concurrent registrations until the
    # pool's timeout).
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=46)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy issue BEGIN itself (see the "begin" hook) instead of pysqlite.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def among(column: Any, ids: Collection[int], session: Session) -> ColumnElement[bool]:
    """``column IN ids``. On PostgreSQL the ids travel as one parameter, an array literal
    (``= ANY``): a query with thousands of ids costs the drivers no more than one with a
    few; SQLite gets an IN list (callers keep it to a few thousand ids)."""
    if session.get_bind().dialect.name == "postgresql":
        literal = "{" + ",".join(str(int(i)) for i in ids) + "}"
        array = sql_cast(bindparam(None, literal, Text()), ARRAY(Integer))
        return cast(ColumnElement[bool], column == any_(array))
    return cast(ColumnElement[bool], column.in_(ids))


def lock_for_update(stmt: T, session: Session) -> T:
    """``SELECT ... FOR UPDATE`` where the database supports row locks."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        return stmt.with_for_update()
    return stmt


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
