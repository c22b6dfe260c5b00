"""Which failures the agent retries (with backoff and jitter) and which are final."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx
import pytest

from agents.agent import Agent, AgentOptions, retryable
from agents.gpu import SimulatedReader
from scheduler.client import ApiClient, ApiError
from scheduler.domain.enums import CommitmentLevel, Role
from scheduler.schemas import NodeRegistered
from tests import factories as f
from tests.agents.live_agent import make_agent, proxy_to

REGISTERED = {
    "node": {
        "name": "node-1",
        "provider": "orion",
        "site": "orion",
        "level": "committed",
        "status": "ready",
        "status_reason": None,
        "hostname": "h",
        "ray_joined": False,
        "last_heartbeat_at": "2026-12-03T12:00:00Z",
        "gpus": [],
    },
    "heartbeat_interval_s": 10,
    "node_lost_after_s": 60,
    "ray_labels": {},
}


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (ConnectionError("refused"), True),
        (ApiError(500, "boom"), True),
        (ApiError(502, "bad gateway"), True),
        (ApiError(503, "unavailable"), True),
        (ApiError(408, "request timeout"), True),
        (ApiError(429, "slow down"), True),
        (ApiError(400, "bad request"), False),
        (ApiError(401, "unknown or revoked token"), False),
        (ApiError(403, "another provider's node"), False),
        (ApiError(404, "not found"), False),
        (ApiError(409, "retired"), False),
        (ApiError(422, "invalid"), False),
        (ValueError("a bug"), False),
    ],
    ids=lambda v: repr(v) if isinstance(v, Exception) else None,
)
def test_5xx_and_connection_errors_are_retried_and_other_4xx_are_final(
    exc: BaseException, retried: bool
) -> None:
    assert retryable(exc) is retried


def _agent_answering(answers: list[int | str], tmp_path: Path) -> tuple[Agent, list[int]]:
    """An agent whose server answers registrations with ``answers`` in turn (a status code,
    or "down" for a refused connection), through httpx's own test transport."""
    calls: list[int] = []

    def handle(request: httpx.Request) -> httpx.Response:
        answer = answers[min(len(calls), len(answers) - 1)]
        calls.append(1)
        if answer == "down":
            raise httpx.ConnectError("connection refused", request=request)
        assert isinstance(answer, int)
        if answer == 200:
            return httpx.Response(200, json=REGISTERED)
        return httpx.Response(answer, json={"detail": f"answer {answer}"})

    client = ApiClient("http://server.test", "t", transport=httpx.MockTransport(handle))
    options = AgentOptions(
        node_name="node-1", data_dir=tmp_path, retry_initial_s=0.001, retry_max_s=0.01
    )
    return Agent(client, SimulatedReader("1xH100-80GB", "node-1"), options), calls


@pytest.mark.parametrize(
    ("answers", "attempts", "final"),
    [
        ([503, 503, 200], 3, None),
        (["down", "down", "down", 200], 4, None),
        ([500, 429, 200], 3, None),
        ([200], 1, None),
        ([401], 1, 401),
        ([403], 1, 403),
        ([404], 1, 404),
        ([422], 1, 422),
        ([502, "down", 409], 3, 409),
    ],
    ids=lambda v: str(v),
)
def test_registration_retries_what_is_worth_retrying(
    answers: list[int | str], attempts: int, final: int | None, tmp_path: Path
) -> None:
    agent, calls = _agent_answering(answers, tmp_path)
    if final is None:
        assert isinstance(agent.register(), NodeRegistered)
    else:
        with pytest.raises(ApiError) as raised:
            agent.register()
        assert raised.value.status_code == final
    assert len(calls) == attempts


def test_a_stop_during_registration_retries_ends_them(tmp_path: Path) -> None:
    agent, calls = _agent_answering(["down"], tmp_path)
    threading.Timer(0.2, agent.request_stop).start()
    with pytest.raises(InterruptedError, match="stopped before registering"):
        agent.register()
    assert len(calls) > 1


def test_the_backoff_grows_with_jitter_up_to_its_cap(tmp_path: Path) -> None:
    agent, _ = _agent_answering(["down"] * 8 + [200], tmp_path)
    waits: list[float] = []
    agent._sleep_unless_stopped = waits.append  # type: ignore[method-assign]
    agent.options = AgentOptions(
        node_name="node-1", data_dir=tmp_path, retry_initial_s=1.0, retry_max_s=4.0
    )
    agent.register()
    assert len(waits) == 8
    assert all(0 <= w <= 4.0 for w in waits)
    assert len(set(waits)) > 1  # jittered, not a fixed ladder


@pytest.fixture
def token(session_of) -> str:  # type: ignore[no-untyped-def]
    with session_of() as s:
        f.provider(s, "orion", CommitmentLevel.committed)
        return f.token(s, Role.provider, "orion")


def test_an_agent_registers_once_the_server_is_back(
    server, token, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_to(server.url)
    agent = make_agent(f"http://127.0.0.1:{proxy.port}", token, tmp_path)
    try:
        registering = threading.Thread(target=agent.register)
        with caplog.at_level(logging.WARNING, logger="agents.agent"), proxy.outage():
            registering.start()
            time.sleep(1.0)
            assert agent.registration is None
        registering.join(10)
        assert agent.registration is not None and agent.registration.node.name == "node-1"
        assert "cannot register yet (cannot reach" in caplog.text
    finally:
        agent.client.close()
        proxy.close()
