"""Stopping the node agent drains its node first: against the real server over HTTP, with
allocations made through the real services, and with real signals to the real command."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlmodel import select

from agents.agent import DRAIN_REASON, Agent
from scheduler.client import ApiClient
from scheduler.db.models import Node
from scheduler.db.types import utcnow
from scheduler.domain.enums import CommitmentLevel, EndReason, JobStatus, Role
from scheduler.schemas import NodePublic
from scheduler.services.transitions import open_allocation_of, transition_job
from tests import factories as f
from tests.agents.live_agent import REPO, make_agent, proxy_to


@pytest.fixture(autouse=True)
def _agent_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agents.agent")


@pytest.fixture
def token(session_of) -> str:  # type: ignore[no-untyped-def]
    with session_of() as s:
        f.provider(s, "orion", CommitmentLevel.committed)
        return f.token(s, Role.provider, "orion")


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def the_node(url: str, token: str) -> NodePublic | None:
    with ApiClient(url, token) as api:
        nodes = api.nodes()
    return nodes[0] if nodes else None


def run_a_job_on(session_of, node_name: str) -> int:  # type: ignore[no-untyped-def]
    """A one-GPU job running on the node, placed as the scheduler would."""
    with session_of() as s:
        node = s.exec(select(Node).where(Node.name == node_name)).one()
        job = f.job(s)
        f.run(s, job, node, utcnow())
        assert job.id is not None
        return job.id


def site_confirms_moved(session_of, job_id: int) -> None:  # type: ignore[no-untyped-def]
    """What the site's report does once the drained job's workers are gone."""
    with session_of() as s:
        transition_job(
            s,
            job_id=job_id,
            to=JobStatus.pending,
            now=utcnow(),
            end_reason=EndReason.provider_reclaim,
            released=True,
        )


@pytest.fixture
def running() -> Iterator[Callable[[Agent], threading.Thread]]:
    threads: list[tuple[Agent, threading.Thread]] = []

    def start(agent: Agent) -> threading.Thread:
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        threads.append((agent, t))
        return t

    yield start
    for agent, t in threads:
        agent.stop_event.set()
        agent._wake.set()
        t.join(10)
        agent.client.close()


def test_a_stop_marks_the_node_draining_and_waits_until_its_gpus_are_free(
    server, session_of, token, tmp_path: Path, running, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(server.url, token, tmp_path, drain_timeout_s=60)
    agent.register()
    job_id = run_a_job_on(session_of, "node-1")
    thread = running(agent)
    wait_for(lambda: agent.last_node is not None, "a first heartbeat")
    agent.request_stop()  # what the first SIGTERM does
    wait_for(lambda: the_node(server.url, token).status.value == "draining", "the drain")  # type: ignore[union-attr]
    node = the_node(server.url, token)
    assert node is not None and node.status_reason == DRAIN_REASON
    with session_of() as s:  # the server asked the site to move the work
        alloc = open_allocation_of(s, job_id)
        assert alloc is not None and alloc.stop_reason == EndReason.provider_reclaim
    time.sleep(1.0)  # five heartbeats: the GPU is still held, the agent still runs
    assert thread.is_alive()
    site_confirms_moved(session_of, job_id)
    thread.join(10)
    assert not thread.is_alive()
    assert "node node-1 is drained: none of its GPUs is held" in caplog.text


def test_a_node_holding_nothing_stops_at_once(server, token, tmp_path: Path, running) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(server.url, token, tmp_path, drain_timeout_s=60)
    thread = running(agent)
    wait_for(lambda: agent.last_node is not None, "a first heartbeat")
    agent.request_stop()
    thread.join(5)
    assert not thread.is_alive()
    assert the_node(server.url, token).status.value == "draining"  # type: ignore[union-attr]


def test_the_drain_timeout_stops_an_agent_whose_work_does_not_move(
    server, session_of, token, tmp_path: Path, running, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(server.url, token, tmp_path, drain_timeout_s=1)
    agent.register()
    run_a_job_on(session_of, "node-1")
    thread = running(agent)
    wait_for(lambda: agent.last_node is not None, "a first heartbeat")
    agent.request_stop()
    thread.join(5)
    assert not thread.is_alive()
    assert "drain timeout with 1 GPU(s) still held; stopping now" in caplog.text


def test_an_unreachable_server_during_the_drain_is_said_and_the_timeout_ends_it(
    server, token, tmp_path: Path, running, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_to(server.url)
    try:
        agent = make_agent(f"http://127.0.0.1:{proxy.port}", token, tmp_path, drain_timeout_s=1)
        thread = running(agent)
        wait_for(lambda: agent.last_node is not None, "a first heartbeat")
        with proxy.outage():
            agent.request_stop()
            thread.join(5)
            assert not thread.is_alive()
    finally:
        proxy.close()
    assert "the server is unreachable, node node-1 not marked draining" in caplog.text
    assert "drain timeout: the server has been unreachable; stopping now" in caplog.text
    assert the_node(server.url, token).status.value == "ready"  # type: ignore[union-attr]


def test_a_restarted_agent_makes_the_node_it_drained_ready_but_not_an_operators_drain(
    server, token, tmp_path: Path, running
) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent(server.url, token, tmp_path)
    agent.register()
    agent.client.set_node_status("node-1", "draining", DRAIN_REASON)
    thread = running(make_agent(server.url, token, tmp_path))
    wait_for(lambda: the_node(server.url, token).status.value == "ready", "the node ready")  # type: ignore[union-attr]
    agent.client.set_node_status("node-1", "draining", "disk swap")
    thread2 = running(make_agent(server.url, token, tmp_path / "again"))
    time.sleep(1.0)
    assert thread.is_alive() and thread2.is_alive()
    node = the_node(server.url, token)
    assert node is not None and (node.status.value, node.status_reason) == ("draining", "disk swap")
    agent.client.close()


# --- real signals to the real command ------------------------------------------------------
def start_agent_command(url: str, token: str, data: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler",
            "agent",
            "--server",
            url,
            "--token",
            token,
            "--name",
            "sig-1",
            "--simulate",
            "1xH100-80GB",
            "--heartbeat-interval",
            "0.2",
            "--drain-timeout",
            "120",
            "--data-dir",
            str(data),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def command(server, token, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:  # type: ignore[no-untyped-def]
    proc = start_agent_command(server.url, token, tmp_path)
    try:
        wait_for(lambda: the_node(server.url, token) is not None, "the node registered", 60)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_sigterm_drains_the_node_and_the_agent_exits_once_its_work_has_moved(
    server, session_of, token, command
) -> None:  # type: ignore[no-untyped-def]
    job_id = run_a_job_on(session_of, "sig-1")
    os.kill(command.pid, signal.SIGTERM)
    wait_for(lambda: the_node(server.url, token).status.value == "draining", "the drain")  # type: ignore[union-attr]
    time.sleep(1.0)
    assert command.poll() is None
    site_confirms_moved(session_of, job_id)
    assert command.wait(15) == 0
    assert command.stderr is not None
    assert b"node sig-1 is drained" in command.stderr.read()


def test_a_second_sigterm_stops_the_agent_at_once(server, session_of, token, command) -> None:  # type: ignore[no-untyped-def]
    run_a_job_on(session_of, "sig-1")
    os.kill(command.pid, signal.SIGTERM)
    wait_for(lambda: the_node(server.url, token).status.value == "draining", "the drain")  # type: ignore[union-attr]
    assert command.poll() is None
    started = time.monotonic()
    os.kill(command.pid, signal.SIGTERM)
    assert command.wait(10) == 0
    assert time.monotonic() - started < 5
    assert command.stderr is not None
    assert b"second stop signal: stopping now" in command.stderr.read()
