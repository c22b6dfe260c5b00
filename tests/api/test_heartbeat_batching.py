"""Heartbeats are group-committed: many at once are written in few transactions, each is
answered only after its batch committed, and a bad one fails alone. Real HTTP, SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlmodel import select

from scheduler.db.models import Gpu, Node, Site
from scheduler.db.types import utcnow
from scheduler.domain.enums import CommitmentLevel, GpuHealth, NodeStatus, Role
from tests import factories as f
from tests.conftest import LiveServer, free_port


def test_concurrent_heartbeats_share_transactions_and_a_bad_one_fails_alone(
    server, session_of
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        for i in range(40):
            f.node(s, orion, f"n-{i}", gpus=2)
        vega = f.provider(s, "vega", CommitmentLevel.spot)
        f.node(s, vega, "vega-1", gpus=1)
        token = f.token(s, Role.provider, "orion")
    stats = server.app.state.heartbeats.stats
    before = (stats.batches, stats.heartbeats)

    async def beat(client: httpx.AsyncClient, node: str, util: int) -> httpx.Response:
        body = {"gpus": [{"uuid": f"GPU-{node}-0", "health": "ok", "utilization_pct": util}]}
        return await client.post(f"/v1/nodes/{node}/heartbeat", json=body)

    async def fleet() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as c:
            calls = [beat(c, f"n-{i}", i) for i in range(40)]
            calls += [beat(c, "vega-1", 1), beat(c, "nobody", 1)]  # not ours; unknown
            return await asyncio.gather(*calls)

    answers = asyncio.run(fleet())
    assert [r.status_code for r in answers[:40]] == [200] * 40
    assert [r.status_code for r in answers[40:]] == [403, 404]
    assert "node 'nobody' not found" in answers[41].text
    ack = answers[7].json()
    assert ack["name"] == "n-7" and ack["status"] == "ready" and ack["busy"] == []
    batches, beats = stats.batches - before[0], stats.heartbeats - before[1]
    # Refused ones never reach the writer; group commit: fewer transactions than requests.
    assert beats == 40 and batches < beats
    with session_of() as s:  # health and liveness are committed before the 200
        healthy = {g.uuid for g in s.exec(select(Gpu).where(Gpu.health == GpuHealth.ok))}
        assert {f"GPU-n-{i}-0" for i in range(40)} <= healthy
    # This server shows the newest samples before they are written...
    shown = httpx.get(f"{server.url}/v1/nodes/n-7", headers={"Authorization": f"Bearer {token}"})
    assert shown.json()["gpus"][0]["utilization_pct"] == 7
    # ...which are written together, in one go.
    server.app.state.heartbeats.flush_samples()
    with session_of() as s:
        utils = {g.uuid: g.utilization_pct for g in s.exec(select(Gpu).where(Gpu.index == 0)) if g}
        assert all(utils[f"GPU-n-{i}-0"] == i for i in range(40))


@pytest.fixture
def both_paths(server, engine, db_url):  # type: ignore[no-untyped-def]
    """The session's server (heartbeats on the fast path) and one more over the same
    database with the fast path off (FastAPI's route serves them): the same contract."""
    from scheduler.api.app import create_app
    from scheduler.config import Settings

    settings = Settings(database_url=db_url, scheduler_enabled=False, heartbeat_fast_path=False)
    with LiveServer(create_app(settings, engine=engine), free_port()) as plain:
        yield {"fast": server, "fastapi": plain}


def test_the_answer_is_the_same_on_both_paths_busy_gpus_lost_back_retired_refused(
    both_paths, session_of
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        busy = f.node(s, orion, "busy-1", gpus=2)
        f.run(s, f.job(s, "train", gpus_per_worker=1), busy, utcnow(), gpus=f.gpu_ids(s, busy)[1:])
        lost = f.node(s, orion, "lost-1", gpus=1)
        lost.status, lost.status_reason = NodeStatus.lost, "no heartbeat since then"
        retired = f.node(s, orion, "gone-1", gpus=1)
        retired.status = NodeStatus.retired
        s.add_all([lost, retired])
        token = f.token(s, Role.provider, "orion")
    headers = {"Authorization": f"Bearer {token}"}
    for path, srv in both_paths.items():

        def beat(node: str, srv: LiveServer = srv, **body: object) -> httpx.Response:
            return httpx.post(f"{srv.url}/v1/nodes/{node}/heartbeat", json=body, headers=headers)

        ack = beat("busy-1", gpus=[{"uuid": "GPU-busy-1-0", "health": "ok"}])
        assert ack.status_code == 200, (path, ack.text)
        assert ack.json()["busy"] == ["GPU-busy-1-1"], path  # held by the running job
        back = beat("lost-1", gpus=[])
        assert (back.json()["status"], back.json()["status_reason"]) == ("ready", None), path
        with session_of() as s:  # back to ready in the database too, before the answer
            assert s.get(Node, lost.id).status == NodeStatus.ready  # type: ignore[union-attr]
            s.get(Node, lost.id).status = NodeStatus.lost  # type: ignore[union-attr]
        refused = beat("gone-1", gpus=[])
        assert refused.status_code == 409 and "was retired" in refused.text, path
        bad = beat("busy-1", gpus=[{"uuid": "GPU-busy-1-0", "utilization_pct": 140}])
        assert bad.status_code == 422, path
        assert [e["loc"] for e in bad.json()["detail"]] == [
            ["body", "gpus", 0, "utilization_pct"]
        ], path
        stranger = beat("busy-1", gpus=[{"uuid": "GPU-nobody"}])
        assert stranger.status_code == 422 and "GPU-nobody" in stranger.text, path
        anonymous = httpx.post(f"{srv.url}/v1/nodes/busy-1/heartbeat", json={"gpus": []})
        assert anonymous.status_code == 401, path
        assert anonymous.headers["www-authenticate"] == "Bearer", path


def test_a_sites_batch_answers_each_node_as_if_it_came_alone(both_paths, session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        site_id = [f.node(s, orion, f"o-{i}", gpus=1) for i in range(3)][0].site_id
        vega = f.provider(s, "vega", CommitmentLevel.spot)
        f.node(s, vega, "v-1", gpus=1)
        token = f.token(s, Role.provider, "orion")
    with session_of() as s:
        site_name = s.get(Site, site_id).name  # type: ignore[union-attr]
    headers = {"Authorization": f"Bearer {token}"}
    body = {
        "nodes": [
            {"name": "o-0", "heartbeat": {"gpus": [{"uuid": "GPU-o-0-0", "health": "ok"}]}},
            {"name": "o-1", "heartbeat": {"gpus": [{"uuid": "GPU-nobody", "health": "ok"}]}},
            {"name": "v-1", "heartbeat": {"gpus": []}},
            {"name": "nobody", "heartbeat": {"gpus": []}},
            {"name": "o-2", "heartbeat": {"gpus": []}},
        ]
    }
    for path, srv in both_paths.items():
        url = f"{srv.url}/v1/sites/{site_name}/heartbeats"
        answer = httpx.post(url, json=body, headers=headers)
        assert answer.status_code == 200, (path, answer.text)
        got = [(n["name"], n["status_code"]) for n in answer.json()["nodes"]]
        assert got == [("o-0", 200), ("o-1", 422), ("v-1", 403), ("nobody", 404), ("o-2", 200)]
        first = answer.json()["nodes"][0]
        assert first["ack"]["status"] == "ready" and first["detail"] is None, path
        assert "GPU-nobody" in str(answer.json()["nodes"][1]["detail"]), path
        with session_of() as s:  # committed before the answer
            assert s.exec(select(Gpu).where(Gpu.uuid == "GPU-o-0-0")).one().health == "ok"
        elsewhere = httpx.post(
            f"{srv.url}/v1/sites/elsewhere/heartbeats", json=body, headers=headers
        )
        assert [n["status_code"] for n in elsewhere.json()["nodes"]][0] == 403, path
        empty = httpx.post(url, json={"nodes": []}, headers=headers)
        assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body", "nodes"]
