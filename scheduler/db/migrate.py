"""Schema by migrations: ``upgrade`` brings any database to the head revision.

The Alembic environment ships inside the package (``scheduler/db/migrations``), so
``andromeda db upgrade`` works from an installed wheel without an ``alembic.ini``.

On PostgreSQL the whole upgrade holds a session-level advisory lock on the connection the
migrations run on, keyed by the schema the tables go to (``current_schema()``, the first
existing schema of the ``search_path``). Servers started at the same moment against one
database therefore upgrade one at a time: the second waits for the first, then finds the
schema at head and does nothing. Upgrades of different schemas of one database do not
wait for each other. SQLite serialises writers itself and takes no lock here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from scheduler.db.engine import make_engine, normalise_url

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
WAITING = "waiting for another server's schema upgrade"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the schema of ``url`` to ``revision``, one process at a time per schema."""
    cfg = alembic_config(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection, schema_upgrade_lock(connection):
            # env.py runs the migrations on this connection, the one holding the lock.
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()  # closes the connection: no pooled session keeps the lock


def upgrade_lock_key(schema: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of upgrades of ``schema``."""
    digest = hashlib.blake2b(f"andromeda schema upgrade {schema}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


@contextmanager
def schema_upgrade_lock(connection: Connection) -> Iterator[None]:
    """Hold the schema's upgrade lock on ``connection`` (PostgreSQL; nothing elsewhere).

    The lock is a session-level advisory lock: it outlives the transactions the migrations
    commit, and PostgreSQL releases it if the process dies. On return the connection is
    outside any transaction, as Alembic expects of a connection it is handed.
    """
    if connection.dialect.name != "postgresql":
        yield
        return
    schema = connection.execute(
        text("SELECT coalesce(current_schema(), current_setting('search_path'))")
    ).scalar_one()
    key = upgrade_lock_key(schema)
    if not connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one():
        log.info("%s of schema %s (PostgreSQL advisory lock %d)", WAITING, schema, key)
        started = time.monotonic()
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        log.info(
            "the other schema upgrade of %s ended after %.1f s; upgrading from where it left",
            schema,
            time.monotonic() - started,
        )
    connection.commit()
    try:
        yield
    finally:
        try:
            if connection.in_transaction():
                connection.rollback()  # a failed migration's transaction
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            connection.commit()
        except Exception:  # a lost connection: its session, and so the lock, is gone
            log.warning("could not release the schema upgrade lock of %s", schema, exc_info=True)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()
