"""Alembic environment: runs migrations against the URL set by scheduler.db.migrate.

``scheduler.db.migrate.upgrade`` hands over the connection to run on (in
``config.attributes["connection"]``), one that holds the schema's upgrade lock on
PostgreSQL. Run any other way, this environment connects and takes the lock itself.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import scheduler.db.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from scheduler.db.engine import make_engine
from scheduler.db.migrate import schema_upgrade_lock

config = context.config
target_metadata = SQLModel.metadata


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    given: Connection | None = config.attributes.get("connection")
    if given is not None:  # scheduler.db.migrate.upgrade, which holds the lock on it
        run_on(given)
        return
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = make_engine(url)
    try:
        with engine.connect() as connection, schema_upgrade_lock(connection):
            run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
