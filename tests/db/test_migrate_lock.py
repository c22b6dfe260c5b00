"""Schema upgrades on PostgreSQL take an advisory lock per schema, in real processes.

Two servers started at once against one fresh schema upgrade it one after the other (the
second waits, then finds it at head); an upgrade of another schema of the same database
does not wait for that lock.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

import scheduler.db.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from scheduler.db.engine import make_engine
from scheduler.db.migrate import (
    WAITING,
    head_revision,
    schema_upgrade_lock,
    upgrade_lock_key,
)
from tests.conftest import BACKENDS, PG_URL, _pg_schema_url

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif("postgres" not in BACKENDS, reason="ANDROMEDA_SKIP_POSTGRES=1"),
]

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 60.0  # generous bounds only: each process takes about a second

# One upgrading process. argv: url, entry ("upgrade" or "alembic"), then optionally a
# file to create once imported and a file to wait for before upgrading (the barrier).
UPGRADER = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from alembic import command
from scheduler.db.migrate import alembic_config, upgrade
url, entry, *barrier = sys.argv[1:]
if barrier:
    ready, go = map(Path, barrier)
    ready.touch()
    while not go.exists():
        time.sleep(0.002)
if entry == "upgrade":
    upgrade(url)
else:  # Alembic's own command: env.py connects and takes the lock itself
    command.upgrade(alembic_config(url), "head")
"""


def _upgrader(url: str, *args: str | Path, entry: str = "upgrade") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", UPGRADER, url, entry, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    """Wait for ``proc``; its stderr, which it must have exited 0 with."""
    try:
        _, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the upgrade did not end within {LIMIT_S:.0f} s:\n{err}")
    assert proc.returncode == 0, f"the upgrade failed (exit {proc.returncode}):\n{err}"
    return err


def _wait(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def new_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], str]]:
    """Makes fresh, empty PostgreSQL schemas (URLs whose search_path is the schema)."""
    made: list[str] = []

    def make() -> str:
        url, schema = _pg_schema_url(tmp_path_factory)
        made.append(schema)
        return url

    yield make
    admin = make_engine(PG_URL)
    with admin.begin() as conn:
        for schema in made:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def _schema_of(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT current_schema()")).scalar_one())


def _versions(engine: Engine) -> list[str] | None:
    """The rows of alembic_version, None while the table does not exist."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())


def _assert_at_head(url: str) -> None:
    engine = make_engine(url)
    try:
        assert _versions(engine) == [head_revision(url)]
        tables = set(inspect(engine).get_table_names())
        assert {t.name for t in SQLModel.metadata.sorted_tables} <= tables
    finally:
        engine.dispose()


def _waiters(engine: Engine, key: int) -> int:
    """Sessions waiting for the advisory lock ``key`` (a bigint key shows as two oids)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND objsubid = 1 AND classid::bigint = :hi AND objid::bigint = :lo"
                ),
                {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
            ).scalar_one()
        )


def test_two_processes_upgrading_one_fresh_schema_at_once_migrate_it_once(
    new_schema: Callable[[], str], tmp_path: Path
) -> None:
    url = new_schema()
    go = tmp_path / "go"
    readies = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [_upgrader(url, ready, go) for ready in readies]
    try:
        _wait(lambda: all(r.exists() for r in readies), "both processes to import")
        go.touch()  # both start their upgrade now
        errs = [_finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    _assert_at_head(url)
    print(f"\n{sum(WAITING in e for e in errs)} of 2 processes waited for the other")


@pytest.mark.parametrize("entry", ["upgrade", "alembic"])
def test_an_upgrade_waits_for_the_schemas_lock_and_says_so(
    new_schema: Callable[[], str], entry: str
) -> None:
    url = new_schema()
    engine = make_engine(url)
    try:
        key = upgrade_lock_key(_schema_of(engine))
        with engine.connect() as holder, schema_upgrade_lock(holder):
            proc = _upgrader(url, entry=entry)
            try:
                _wait(lambda: _waiters(engine, key) == 1, "the upgrade to wait for the lock")
                time.sleep(0.2)
                assert proc.poll() is None and _versions(engine) is None  # nothing done yet
            except BaseException:
                proc.kill()
                proc.communicate()
                raise
        err = _finish(proc)  # the lock is released: it upgrades now
    finally:
        engine.dispose()
    assert WAITING in err
    _assert_at_head(url)


def test_an_upgrade_does_not_wait_for_the_lock_of_another_schema(
    new_schema: Callable[[], str],
) -> None:
    held_url, url = new_schema(), new_schema()
    engine = make_engine(held_url)
    try:
        with engine.connect() as holder, schema_upgrade_lock(holder):
            err = _finish(_upgrader(url))  # within LIMIT_S, while the other lock is held
            assert _versions(engine) is None  # the held schema is untouched
    finally:
        engine.dispose()
    assert WAITING not in err
    _assert_at_head(url)


def test_schemas_have_lock_keys_of_their_own() -> None:
    keys = {upgrade_lock_key(s) for s in ("public", "t_a", "t_b", "T_a")}
    assert len(keys) == 4 and all(-(2**63) <= k < 2**63 for k in keys)
