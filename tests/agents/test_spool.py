"""The evidence spool: durable, bounded, replayed in order after an outage, never stored
twice; against the real server over HTTP on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.agent import SPOOL_FULL_REASON
from agents.spool import Spool
from scheduler.client import ApiClient
from scheduler.domain.enums import CommitmentLevel, Role
from scheduler.schemas import EvidenceBatch, EvidenceWindow
from tests import factories as f
from tests.agents.live_agent import REPO, make_agent, proxy_to, stored_keys, windows_for

A, B = "GPU-aaaa", "GPU-bbbb"


def keys(rows: list[tuple[int, EvidenceWindow]]) -> list[tuple[str, int]]:
    return [(w.uuid, w.start_s) for _, w in rows]


# --- the spool on its own ------------------------------------------------------------------
def test_windows_are_kept_once_in_order_until_removed(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        assert spool.add(windows_for([A, B], 3)) == 6
        assert spool.add(windows_for([A], 2)) == 0  # already there: kept once
        assert spool.pending() == 6
        oldest = spool.oldest(4)
        assert keys(oldest) == [
            (A, 1_800_000_000),
            (B, 1_800_000_000),
            (A, 1_800_000_060),
            (B, 1_800_000_060),
        ]
        assert keys(spool.newest(2)) == [(A, 1_800_000_120), (B, 1_800_000_120)]
        spool.remove([rid for rid, _ in oldest])
        assert keys(spool.oldest(10)) == [(A, 1_800_000_120), (B, 1_800_000_120)]
        assert spool.oldest(1)[0][1] == windows_for([A, B], 3)[4]  # every field comes back


def test_the_spool_and_its_state_survive_closing_and_reopening(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        spool.add(windows_for([A], 5))
        spool.set_state(heartbeat='{"gpus": []}', clock_offset_s="1.5")
    with Spool(tmp_path / "spool.db") as again:
        assert again.pending() == 5
        assert again.state("clock_offset_s") == "1.5" and again.state("nothing") is None
        mode = again._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


WRITER = """
import sys
from pathlib import Path
from agents.spool import Spool
from tests.agents.live_agent import windows_for
spool = Spool(Path(sys.argv[1]))
for minute in range(100_000):
    spool.add(windows_for(["GPU-aaaa", "GPU-bbbb"], 1, start_s=1_800_000_000 + 60 * minute))
    print(minute + 1, flush=True)
"""


def test_every_window_added_before_a_kill_9_is_there_after_it(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acknowledged = 0
    while acknowledged < 200:
        acknowledged = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    with Spool(path) as spool:
        assert spool.pending() >= 2 * acknowledged
        assert spool._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert spool.oldest(1)[0][1].start_s == 1_800_000_000


def test_a_full_spool_refuses_new_windows_and_keeps_the_old(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path / "spool.db", max_bytes=96 * 1024) as spool:
        minute = 0
        while spool.add(windows_for([A, B], 1, start_s=1_800_000_000 + 60 * minute)):
            minute += 1
            assert minute < 10_000, "the spool never filled"
        kept = spool.pending()
        assert spool.near_full() and spool.fill() >= 1.0
        assert spool.add(windows_for([A, B], 1, start_s=1_700_000_000)) == 0
        assert spool.pending() == kept and spool.refused_full == 4
        assert keys(spool.oldest(1)) == [(A, 1_800_000_000)]  # the oldest are never dropped
    assert "is full (0 MiB): 2 window(s) refused, 4 since start" in caplog.text


# --- against the server ---------------------------------------------------------------------
@pytest.fixture
def token(session_of) -> str:  # type: ignore[no-untyped-def]
    with session_of() as s:
        f.provider(s, "orion", CommitmentLevel.committed)
        return f.token(s, Role.provider, "orion")


@pytest.fixture
def proxy(server) -> Iterator:  # type: ignore[no-untyped-def]
    p = proxy_to(server.url)
    yield p
    p.close()


def test_an_outage_is_spooled_and_replayed_when_the_server_returns(
    server, engine, token, proxy, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(f"http://127.0.0.1:{proxy.port}", token, tmp_path)
    agent.open_spool()
    agent.register()
    agent.step()
    assert agent.spool is not None
    with proxy.outage():
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            agent.step()
            time.sleep(0.1)
        spooled = keys(agent.spool.oldest(10_000))
    assert len(spooled) >= 4  # two GPUs, two 1-s windows at least
    agent.step()
    assert agent.spool.pending() == 0
    stored = stored_keys(engine, "node-1")
    assert set(spooled) <= set(stored) and len(stored) == len(set(stored))
    for uuid in {u for u, _ in stored}:  # one window a second, none missing, none twice
        starts = [s for u, s in stored if u == uuid]
        assert starts == list(range(starts[0], starts[0] + len(starts)))
    agent.client.close()


def test_a_backlog_is_replayed_oldest_first_and_a_second_replay_stores_nothing(
    server, engine, token, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(server.url, token, tmp_path)
    spool = agent.open_spool()
    node = agent.register().node
    backlog = windows_for([g.uuid for g in node.gpus], 2_500)  # 5,000 windows
    spool.add(backlog)
    batches: list[list[int]] = []

    def send(ws: list[EvidenceWindow]):  # type: ignore[no-untyped-def]
        batches.append([w.start_s for w in ws])
        return agent.client.post_evidence("node-1", EvidenceBatch(windows=ws))

    first = spool.replay(send)
    assert (first.stored, first.duplicates, first.requests, first.pending) == (5_000, 0, 3, 0)
    sent = [s for b in batches for s in b]
    assert sent == sorted(sent) and [len(b) for b in batches] == [2048, 2048, 904]
    spool.add(backlog)  # a spool that replays again (a crash before its deletes)
    again = spool.replay(send)
    assert (again.stored, again.duplicates, again.pending) == (0, 5_000, 0)
    assert len(stored_keys(engine, "node-1")) == 5_000
    agent.client.close()


def test_heartbeats_carry_the_newest_windows_and_the_rest_is_replayed(
    server, engine, token, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(server.url, token, tmp_path)
    spool = agent.open_spool()
    node = agent.register().node
    spool.add(windows_for([g.uuid for g in node.gpus], 1_500))  # 3,000: more than one beat
    agent.step()
    assert spool.pending() == 0
    assert len(stored_keys(engine, "node-1")) >= 3_000
    agent.client.close()


def test_a_window_the_server_refuses_is_dropped_alone_and_heartbeats_go_on(
    server, engine, token, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(server.url, token, tmp_path)
    spool = agent.open_spool()
    node = agent.register().node
    good = windows_for([g.uuid for g in node.gpus], 5)
    spool.add([*good[:4], *windows_for(["GPU-not-on-this-node"], 1), *good[4:]])
    agent.step()
    assert spool.pending() == 0
    assert len(stored_keys(engine, "node-1")) >= 10
    assert "refused evidence window GPU-not-on-this-node@1800000000 for good" in caplog.text
    with ApiClient(server.url, token) as api:
        (listed,) = api.nodes()
    assert listed.last_heartbeat_at > node.last_heartbeat_at
    agent.client.close()


KILLED_AGENT = """
import sys
from pathlib import Path
from tests.agents.live_agent import make_agent
make_agent(sys.argv[1], sys.argv[2], Path(sys.argv[3]), name="node-k").run()
"""


def test_an_agent_killed_during_an_outage_replays_its_spool_when_restarted(
    server, engine, token, proxy, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    url = f"http://127.0.0.1:{proxy.port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_AGENT, url, token, str(tmp_path)],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    try:
        with ApiClient(server.url, token) as api:
            deadline = time.monotonic() + 60
            while not api.nodes():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        spool_db = tmp_path / "spool.db"
        with proxy.outage():
            deadline = time.monotonic() + 60
            while _pending(spool_db) < 6:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            with Spool(spool_db) as spool:
                spooled = keys(spool.oldest(10_000))
        assert len(spooled) >= 6
        restarted = make_agent(url, token, tmp_path, name="node-k")
        restarted.open_spool()
        restarted.register()
        restarted.step()
        assert restarted.spool is not None and restarted.spool.pending() == 0
        stored = stored_keys(engine, "node-k")
        assert set(spooled) <= set(stored) and len(stored) == len(set(stored))
        restarted.client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _pending(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT count(*) FROM windows").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_a_nearly_full_spool_cordons_the_node_and_a_drained_one_makes_it_ready(
    server, token, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(server.url, token, tmp_path)
    spool = agent.open_spool()
    node = agent.register().node
    spool.add(windows_for([g.uuid for g in node.gpus], 200))
    spool.max_bytes = int(spool.used_bytes() / 0.95)
    agent.keep_spool_status(node)
    with ApiClient(server.url, token) as api:
        (cordoned,) = api.nodes()
        assert (cordoned.status.value, cordoned.status_reason) == ("cordoned", SPOOL_FULL_REASON)
        spool.remove([rid for rid, _ in spool.oldest(10_000)])
        agent.keep_spool_status(cordoned)
        (ready,) = api.nodes()
        assert ready.status.value == "ready"
        # a cordon someone else set is theirs to lift
        api.set_node_status("node-1", "cordoned", "maintenance")
        (theirs,) = api.nodes()
        agent.keep_spool_status(theirs)
        (still,) = api.nodes()
        assert (still.status.value, still.status_reason) == ("cordoned", "maintenance")
    agent.client.close()
