"""What the benchmarks share: progress lines, text tables, fresh databases to measure on,
and ``andromeda server`` processes to measure against.

A benchmark runs as ``.venv/bin/python bench/bench_x.py`` from the repository root, so its
folder, ``bench/``, comes first on ``sys.path`` and ``from common import ...`` finds this
module. It imports ``scheduler``: a benchmark puts the repository root on ``sys.path``
before importing it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import httpx
from sqlalchemy import text

from scheduler.cli.localstack import free_port
from scheduler.db.engine import make_engine, session_scope
from scheduler.db.migrate import upgrade
from scheduler.db.types import utcnow
from scheduler.domain.enums import CommitmentLevel, Role
from scheduler.schemas import GpuReport
from scheduler.services.providers import add_agreement, create_provider
from scheduler.services.sites import create_site
from scheduler.services.tokens import create_token

__all__ = [
    "PG_URL",
    "Server",
    "database",
    "free_port",
    "h100_reports",
    "logger",
    "provider_token",
    "server",
    "table",
]

PG_URL = os.environ.get("DATABASE_TEST_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
"""The PostgreSQL database in which :func:`database` makes its schemas."""


# output -------------------------------------------------------------------------------------
def logger(prefix: str = "") -> Callable[[str], None]:
    """A ``log(msg)`` that writes ``msg`` as one line to stderr, flushed at once (progress
    goes there, tables to stdout); preceded by ``[prefix] `` when a prefix is given."""
    head = f"[{prefix}] " if prefix else ""

    def log(msg: str) -> None:
        print(f"{head}{msg}", file=sys.stderr, flush=True)

    return log


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, left: int = 0) -> str:
    """``rows`` under ``headers`` as text: each column as wide as its widest cell, columns
    separated by `` | ``, a ``-+-`` rule under the headers. Headers are left-aligned and
    cells right-aligned, except the cells of the first ``left`` columns (labels), which are
    left-aligned too."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    out = [
        " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    out += [
        " | ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    return "\n".join(out)


# databases ----------------------------------------------------------------------------------
@contextmanager
def database(kind: Literal["sqlite", "postgresql"]) -> Iterator[str]:
    """A fresh database migrated to the current schema; yields its URL and removes it at the
    end. ``sqlite``: a file in a temporary folder. ``postgresql``: a schema of its own in
    :data:`PG_URL`'s database (``DATABASE_TEST_URL``), dropped with all it holds."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="andromeda-bench-") as tmp:
            url = f"sqlite:///{tmp}/bench.db"
            upgrade(url)
            yield url
        return
    if kind != "postgresql":
        raise ValueError(f"unknown database kind {kind!r}")
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def provider_token(url: str, name: str = "bench") -> str:
    """Adds provider ``name``, with a reserved agreement and a site of the same name, to the
    database at ``url``; returns a new provider token of it, for its agents."""
    engine = make_engine(url)
    try:
        with session_scope(engine) as s:
            provider = create_provider(s, name=name)
            add_agreement(s, provider=provider, level=CommitmentLevel.reserved, starts_at=utcnow())
            create_site(s, provider=provider, name=name)
            _, token = create_token(
                s, name=f"{name}-agents", role=Role.provider, provider_name=name
            )
    finally:
        engine.dispose()
    return token


def h100_reports(uuids: Iterable[str]) -> list[GpuReport]:
    """A node's GPUs as it registers them: an H100 80GB HBM3 per UUID, indexed in order."""
    return [
        GpuReport(
            uuid=gpu_uuid,
            index=i,
            name="NVIDIA H100 80GB HBM3",
            memory_total_bytes=85_520_809_984,
        )
        for i, gpu_uuid in enumerate(uuids)
    ]


# the server ---------------------------------------------------------------------------------
class Server:
    """``andromeda server`` (``python -m scheduler server``) as a process of its own, on a
    free port that it keeps across restarts, so that its ``url`` stays valid. It runs in a
    session of its own: a Ctrl-C of the benchmark reaches the benchmark, which stops it.

    ``scheduler``: run the scheduling loop too (else ``--no-scheduler``); ``log_level``:
    ``--log-level`` (``None``: the server's default); ``log_file``: where its stdout and
    stderr go, appended to (``None``: nowhere)."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        name: str = "server",
        scheduler: bool = False,
        log_level: str | None = "warning",
        log_file: Path | None = None,
    ) -> None:
        self.name = name
        self.env = dict(env)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "scheduler", "server", "--port", str(self.port)]
        if not scheduler:
            self.command.append("--no-scheduler")
        if log_level is not None:
            self.command += ["--log-level", log_level]
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90) -> Server:
        """Starts the process; returns once ``GET /healthz`` answers 200. RuntimeError if
        the process exits first or does not answer within ``timeout_s``."""
        see = f"; see {self.log_file}" if self.log_file else ""
        with open(self.log_file, "ab") if self.log_file else nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited ({self.proc.returncode}){see}")
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"server {self.name} did not answer within {timeout_s:g} s{see}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        """Sends ``sig`` to the process if it still runs (``SIGKILL``: ``kill -9``) and waits
        for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout_s)


@contextmanager
def server(url: str, *, token: str | None = None, **options: Any) -> Iterator[str]:
    """A :class:`Server` on the database at ``url`` (``DATABASE_URL``), by default the API
    alone logging warnings and worse (``options``: those of :class:`Server`), with
    ``ANDROMEDA_TOKEN`` set to ``token`` if given; yields its base URL once it answers, and
    stops it at the end."""
    env = dict(os.environ, DATABASE_URL=url)
    if token is not None:
        env["ANDROMEDA_TOKEN"] = token
    process = Server(env, **options).start()
    try:
        yield process.url
    finally:
        process.stop()
