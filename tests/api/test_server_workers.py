"""``andromeda server --workers N``: several processes on one port, on PostgreSQL only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from scheduler.cli.main import cli
from scheduler.db.engine import session_scope
from scheduler.db.migrate import upgrade
from scheduler.domain.enums import CommitmentLevel, Role
from tests import factories as f
from tests.conftest import BACKENDS, free_port

pytestmark = pytest.mark.postgres


def test_several_workers_are_refused_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    out = CliRunner().invoke(cli, ["server", "--workers", "2"], env={"DATABASE_URL": url})
    assert out.exit_code != 0
    assert "--workers needs PostgreSQL" in out.output


@pytest.mark.skipif("postgres" not in BACKENDS, reason="PostgreSQL is skipped")
def test_two_processes_serve_one_port_and_take_heartbeats(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from scheduler.db.engine import make_engine
    from tests.conftest import PG_URL, _pg_schema_url

    url, schema = _pg_schema_url(tmp_path_factory)
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        for i in range(8):
            f.node(s, orion, f"w-{i}", gpus=1)
        token = f.token(s, Role.provider, "orion")
        admin = f.token(s, Role.admin)
    port = free_port()
    env = dict(os.environ, DATABASE_URL=url, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "scheduler", "server", "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(
        [*cmd, "--no-scheduler"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        answered: set[int] = set()
        for round_ in range(200):  # new connections, until both processes took some
            if len(answered) == 2 and round_ >= 8:
                break
            i = round_ % 8
            body = {"gpus": [{"uuid": f"GPU-w-{i}-0", "health": "ok"}]}
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as c:
                ack = c.post(f"/v1/nodes/w-{i}/heartbeat", json=body)
            assert ack.status_code == 200, ack.text
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"}) as c:
                stats = c.get("/v1/admin/heartbeats").json()
            answered.add(stats["pid"])
        assert len(answered) == 2 and proc.pid not in answered  # two processes served
        assert stats["heartbeats"] < round_  # each counts its own
        with session_scope(engine) as s:  # every heartbeat was committed, whoever took it
            healthy = s.execute(text("SELECT count(*) FROM gpu WHERE health = 'ok'")).scalar()
            assert healthy == 8
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        engine.dispose()
        admin_engine = make_engine(PG_URL)
        with admin_engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin_engine.dispose()
