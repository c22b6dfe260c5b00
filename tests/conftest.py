"""Shared fixtures: real databases (SQLite and PostgreSQL), a real HTTP server, factories.

PostgreSQL is required: when it cannot be reached the database tests fail with the reason,
they are not skipped (set ANDROMEDA_SKIP_POSTGRES=1 to run SQLite only on a laptop without
it). The Ray cluster fixtures live in tests/ray_cluster.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from scheduler.db.engine import make_engine, session_scope
from scheduler.db.migrate import upgrade

PG_URL = os.environ.get("DATABASE_TEST_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = (
    ["sqlite"] if os.environ.get("ANDROMEDA_SKIP_POSTGRES") == "1" else ["sqlite", "postgres"]
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_schema_url(tmp_factory: pytest.TempPathFactory) -> tuple[str, str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"PostgreSQL at {PG_URL} is required for these tests: {exc}", pytrace=False)
    finally:
        admin.dispose()
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}", schema


@pytest.fixture(scope="session", params=BACKENDS)
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated database per backend for the whole session (tables emptied per test)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'andromeda.db'}"
        upgrade(url)
        yield url
        return
    url, schema = _pg_schema_url(tmp_path_factory)
    upgrade(url)
    yield url
    admin = make_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="session")
def _engines() -> Iterator[dict[str, Engine]]:
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


@pytest.fixture
def engine(db_url: str, _engines: dict[str, Engine]) -> Engine:
    """The session's engine for this backend, with every table emptied."""
    if db_url not in _engines:
        _engines[db_url] = make_engine(db_url)
    eng = _engines[db_url]
    _empty(eng)
    return eng


def _empty(engine: Engine) -> None:
    import scheduler.db.models  # noqa: F401

    tables = [t.name for t in SQLModel.metadata.sorted_tables]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            # ids restart at 1 too: SQLite reuses max(rowid)+1 (no AUTOINCREMENT here)
            for name in reversed(tables):
                conn.execute(text(f"DELETE FROM {name}"))


@pytest.fixture
def db_kind(engine: Engine) -> str:
    return engine.dialect.name


class LiveServer:
    """The real app under uvicorn in a thread, on a free local port."""

    def __init__(self, app, port: int) -> None:  # type: ignore[no-untyped-def]
        self.app = app
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            loop="asyncio",
            http="httptools",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.app.state.notifier.close()  # answer long polls now, as `andromeda server` does
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="session")
def _servers(_engines: dict[str, Engine]) -> Iterator[dict[str, LiveServer]]:
    servers: dict[str, LiveServer] = {}
    yield servers
    for s in servers.values():
        s.__exit__(None, None, None)


@pytest.fixture
def server(engine: Engine, db_url: str, _servers: dict[str, LiveServer]) -> LiveServer:
    """An HTTP server over this backend's database, without a scheduler loop."""
    from scheduler.api.app import create_app
    from scheduler.config import Settings

    if db_url not in _servers:
        settings = Settings(database_url=db_url, scheduler_enabled=False)
        _servers[db_url] = LiveServer(create_app(settings, engine=engine), free_port()).__enter__()
    return _servers[db_url]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


REPO = Path(__file__).resolve().parents[1]


# --- the repository stands alone ------------------------------------------------------------
# Every file a test reads must be inside the repository (or be the system's: Python, the
# venv, temporary files). An audit hook records each file this test process opens for
# reading under the folder that holds the clone but outside the clone itself (where a
# sibling folder of reference data would be); tests/test_standalone.py fails if there is any.
OUTSIDE_READS: list[str] = []


def _outside(path: str) -> bool:
    here = str(REPO) + os.sep
    beside = str(REPO.parent) + os.sep
    tmp = os.path.realpath(tempfile.gettempdir()) + os.sep
    return path.startswith(beside) and not path.startswith(here) and not path.startswith(tmp)


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event != "open" or not args:
        return
    target, mode = args[0], args[1] if len(args) > 1 else "r"
    if not isinstance(target, str | bytes | os.PathLike) or isinstance(target, int):
        return
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return
    path = os.path.realpath(os.fsdecode(target))
    if _outside(path):
        OUTSIDE_READS.append(path)


sys.addaudithook(_audit)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if OUTSIDE_READS:
        reads = "\n  ".join(sorted(set(OUTSIDE_READS)))
        print(f"\nFAILED: files outside the repository were read:\n  {reads}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def session_of(engine: Engine):  # type: ignore[no-untyped-def]
    """``with session_of() as s:`` a committed transaction on this test's database."""
    return lambda: session_scope(engine)


# --- one real site (a local Ray cluster with token auth) per test session -----------------
RAY_NODES = {  # node name -> GPUs; one site, "orion"; the nodes carry the labels agents set
    "ray-a": 2,
    "ray-b": 2,
    "ray-c": 4,
}
SITE = "orion"


@pytest.fixture(scope="session")
def ray_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A site's Ray cluster: a head (``ray-a``) and two labelled worker nodes, simulated
    GPUs, token authentication on. Yields its address, token file and scratch folders."""
    from agents.raynode import RayNode, ensure_token, token_env
    from scheduler.domain.labels import node_labels

    root = tmp_path_factory.mktemp("site")
    token = ensure_token(root / "ray-token")
    ray_tmp = Path(tempfile.mkdtemp(prefix="andr-test-"))
    nodes = []
    try:
        for i, (name, gpus) in enumerate(RAY_NODES.items()):
            head = i == 0
            node = RayNode(
                address=None if head else nodes[0].gcs_address,
                token_file=token,
                head_port=free_port(),
                num_gpus=gpus,
                num_cpus=2,
                labels=node_labels(node=name, provider="orion", site=SITE, level="reserved"),
                temp_dir=ray_tmp / name,
                log_path=root / f"{name}.log",
            )
            node.start()
            nodes.append(node)
        os.environ.update(token_env(token))  # this process drives the site's Ray
        yield {
            "address": nodes[0].gcs_address,
            "token": token,
            "scratch": root / "scratch",
            "checkpoints": root / "checkpoints",
        }
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            for node in reversed(nodes):
                node.stop(grace_s=10)
            shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def launcher(ray_site: dict[str, object]):  # type: ignore[no-untyped-def]
    """The site launcher connected to the session's site; waits until Ray has every node."""
    from agents.site.launcher import SiteLauncher

    site = SiteLauncher(
        str(ray_site["address"]),
        SITE,
        scratch_root=ray_site["scratch"],  # type: ignore[arg-type]
        checkpoint_root=ray_site["checkpoints"],  # type: ignore[arg-type]
        reserve_timeout_s=60,
        missing_node_grace_s=3,
    )
    site.connect()
    deadline = time.monotonic() + 60
    while set(site.alive_nodes()) != set(RAY_NODES):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray has only {site.alive_nodes()} of {sorted(RAY_NODES)}")
        time.sleep(0.5)
    yield site
    for alloc in site.active():
        site.stop(alloc, grace_s=2)
