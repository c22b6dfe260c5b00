"""Heartbeats are group-committed: many at once are written in few transactions, each is
answered only after its batch committed, and a bad one fails alone. Real HTTP, SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio

import httpx
from sqlmodel import select

from scheduler.db.models import Gpu
from scheduler.domain.enums import CommitmentLevel, Role
from tests import factories as f


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
    assert answers[7].json()["gpus"][0]["utilization_pct"] == 7
    batches, beats = stats.batches - before[0], stats.heartbeats - before[1]
    assert beats == 42 and batches < beats  # group commit: fewer transactions than requests
    with session_of() as s:  # every answered heartbeat is in the database
        utils = {g.uuid: g.utilization_pct for g in s.exec(select(Gpu).where(Gpu.index == 0)) if g}
        assert all(utils[f"GPU-n-{i}-0"] == i for i in range(40))
