"""The REST API over real HTTP (uvicorn), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlmodel import col, func, select

from scheduler.db.models import Gpu, Job, Node, Provider
from scheduler.domain.enums import CommitmentLevel, Role
from tests import factories as f

GOOD_JOB: dict[str, Any] = {
    "name": "mini-lm",
    "model": "andromeda-mini:v1",
    "entrypoint": "python train.py",
    "priority": "high",
    "workers": 2,
    "gpus_per_worker": 2,
    "gpu": {"model": "H100"},
}


@pytest.fixture
def fleet(session_of) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Two providers with one 4-GPU node each, and a token per role."""
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        vega = f.provider(s, "vega", CommitmentLevel.spot)
        f.node(s, orion, "orion-1", gpus=4)
        f.node(s, vega, "vega-1", gpus=4)
        f.ensure_model_version(s, "andromeda-mini:v1")
        return {
            "admin": f.token(s, Role.admin),
            "engineer": f.token(s, Role.engineer),
            "partner": f.token(s, Role.partner_manager),
            "orion": f.token(s, Role.provider, "orion"),
            "vega": f.token(s, Role.provider, "vega"),
        }


def call(server, token: str | None, method: str, path: str, **kw: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, server.url + path, headers=headers, timeout=10, **kw)


def _field_errors(resp: httpx.Response) -> dict[str, str]:
    assert resp.status_code == 422, resp.text
    return {".".join(str(p) for p in e["loc"][1:]): e["msg"] for e in resp.json()["detail"]}


def test_a_valid_job_is_accepted_and_queued(server, fleet) -> None:  # type: ignore[no-untyped-def]
    resp = call(server, fleet["engineer"], "POST", "/v1/jobs", json=GOOD_JOB)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert (
        body["status"] == "pending"
        and body["priority"] == "high"
        and body["owner"] == "engineer-token"
    )
    listed = call(server, fleet["engineer"], "GET", "/v1/jobs").json()
    assert [j["id"] for j in listed] == [body["id"]]
    detail = call(server, fleet["engineer"], "GET", f"/v1/jobs/{body['id']}").json()
    assert detail["allocations"] == [] and detail["entrypoint"] == "python train.py"


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"gpus_per_worker": 0}, "gpus_per_worker", "must be at least 1 (got 0)"),
        ({"gpus_per_worker": 8}, "gpus_per_worker", "the largest node has 4"),
        ({"priority": "urgent"}, "priority", "'critical', 'high', 'normal' or 'low'"),
        ({"entrypoint": None}, "entrypoint", "required, but missing"),
        ({"entrypoint": "   "}, "entrypoint", "must not be blank"),
        ({"workers": -1}, "workers", "must be at least 1 (got -1)"),
        ({"name": "Bad Name!"}, "name", "must be a lower-case DNS label"),
        ({"max_runtime": "soon"}, "max_runtime", "is not a duration"),
        ({"env": {"RANK": "3"}}, "env", "set by the scheduler"),
        ({"surprise": 1}, "surprise", "unknown field; expected one of"),
    ],
)
def test_a_malformed_job_gets_a_422_naming_the_field_and_nothing_is_stored(  # type: ignore[no-untyped-def]
    server, fleet, session_of, change, field, problem
) -> None:
    spec = {k: v for k, v in {**GOOD_JOB, **change}.items() if v is not None}
    errors = _field_errors(call(server, fleet["engineer"], "POST", "/v1/jobs", json=spec))
    assert field in errors, errors
    assert problem in errors[field]
    with session_of() as s:
        assert s.exec(select(func.count(col(Job.id)))).one() == 0


@pytest.mark.parametrize("token", [None, "andr_not-a-real-token"])
def test_a_missing_or_unknown_token_gets_401(server, fleet, token) -> None:  # type: ignore[no-untyped-def]
    resp = call(server, token, "GET", "/v1/jobs")
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"


def test_a_revoked_token_stops_working(server, fleet) -> None:  # type: ignore[no-untyped-def]
    created = call(
        server, fleet["admin"], "POST", "/v1/tokens", json={"name": "ci", "role": "engineer"}
    ).json()
    assert call(server, created["token"], "GET", "/v1/jobs").status_code == 200
    assert call(server, fleet["admin"], "DELETE", f"/v1/tokens/{created['id']}").status_code == 200
    assert call(server, created["token"], "GET", "/v1/jobs").status_code == 401
    listed = call(server, fleet["admin"], "GET", "/v1/tokens").json()
    assert all("token" not in t for t in listed), "secrets must never be listed"


@pytest.mark.parametrize(
    ("who", "method", "path", "body"),
    [
        ("orion", "POST", "/v1/jobs", GOOD_JOB),  # providers do not submit jobs
        ("partner", "POST", "/v1/jobs", GOOD_JOB),
        ("engineer", "POST", "/v1/providers", {"name": "x"}),
        ("engineer", "GET", "/v1/tokens", None),
        ("orion", "POST", "/v1/nodes/vega-1/heartbeat", {"gpus": []}),  # another provider's node
        ("vega", "POST", "/v1/nodes/orion-1/status", {"status": "draining"}),
    ],
)
def test_a_role_or_provider_acting_outside_its_rights_gets_403(
    server, fleet, who, method, path, body
) -> None:  # type: ignore[no-untyped-def]
    resp = call(server, fleet[who], method, path, json=body)
    assert resp.status_code == 403, resp.text


def test_a_provider_cannot_register_a_node_name_owned_by_another_provider(
    server, fleet, session_of
) -> None:  # type: ignore[no-untyped-def]
    body = {
        "name": "orion-1",
        "gpus": [
            {
                "uuid": "GPU-evil-0",
                "index": 0,
                "name": "NVIDIA H100 80GB HBM3",
                "memory_total_bytes": 85_520_809_984,
            }
        ],
    }
    resp = call(server, fleet["vega"], "POST", "/v1/nodes/register", json=body)
    assert resp.status_code == 403
    with session_of() as s:  # the node and its GPUs are untouched
        node = s.exec(select(Node).where(Node.name == "orion-1")).one()
        assert s.get(Provider, node.provider_id).name == "orion"  # type: ignore[union-attr]
        assert s.exec(select(Gpu).where(Gpu.uuid == "GPU-evil-0")).first() is None


def test_an_agent_registers_heartbeats_and_its_node_shows_its_gpus(server, fleet) -> None:  # type: ignore[no-untyped-def]
    body = {
        "name": "vega-2",
        "hostname": "h",
        "gpus": [
            {
                "uuid": f"GPU-v2-{i}",
                "index": i,
                "name": "NVIDIA H200",
                "memory_total_bytes": 150_754_820_096,
            }
            for i in range(2)
        ],
    }
    reg = call(server, fleet["vega"], "POST", "/v1/nodes/register", json=body)
    assert reg.status_code == 200, reg.text
    data = reg.json()
    assert data["node"]["level"] == "spot" and data["ray_labels"]["andromeda.io/node"] == "vega-2"
    assert [g["model"] for g in data["node"]["gpus"]] == ["H200-141GB", "H200-141GB"]
    hb = call(
        server,
        fleet["vega"],
        "POST",
        "/v1/nodes/vega-2/heartbeat",
        json={"gpus": [{"uuid": "GPU-v2-0", "health": "ok", "utilization_pct": 87}]},
    )
    assert hb.status_code == 200, hb.text
    assert hb.json()["status"] == "ready" and hb.json()["busy"] == []
    shown = call(server, fleet["vega"], "GET", "/v1/nodes/vega-2")
    gpus = {g["uuid"]: g for g in shown.json()["gpus"]}
    assert gpus["GPU-v2-0"]["utilization_pct"] == 87 and gpus["GPU-v2-0"]["health"] == "ok"
    assert gpus["GPU-v2-1"]["health"] == "unknown"
    bad = call(
        server,
        fleet["vega"],
        "POST",
        "/v1/nodes/vega-2/heartbeat",
        json={"gpus": [{"uuid": "GPU-v2-0", "utilization_pct": 140}]},
    )
    assert "gpus.0.utilization_pct" in _field_errors(bad)


def test_a_provider_sees_only_its_own_nodes_and_usage(server, fleet) -> None:  # type: ignore[no-untyped-def]
    nodes = call(server, fleet["orion"], "GET", "/v1/nodes").json()
    assert [n["name"] for n in nodes] == ["orion-1"]
    all_nodes = call(server, fleet["partner"], "GET", "/v1/nodes").json()
    assert {n["name"] for n in all_nodes} == {"orion-1", "vega-1"}
    assert call(server, fleet["orion"], "GET", "/v1/usage").status_code == 200


def test_cancelling_a_pending_job_finishes_it_and_a_second_cancel_conflicts(server, fleet) -> None:  # type: ignore[no-untyped-def]
    job = call(server, fleet["engineer"], "POST", "/v1/jobs", json=GOOD_JOB).json()
    first = call(server, fleet["engineer"], "POST", f"/v1/jobs/{job['id']}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    again = call(server, fleet["engineer"], "POST", f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert call(server, fleet["engineer"], "GET", "/v1/jobs/999999").status_code == 404


def test_usage_needs_a_time_zone_and_an_ordered_window(server, fleet) -> None:  # type: ignore[no-untyped-def]
    naive = call(
        server, fleet["partner"], "GET", "/v1/usage", params={"start": "2026-11-01T00:00:00"}
    )
    assert "start" in _field_errors(naive)
    backwards = call(
        server,
        fleet["partner"],
        "GET",
        "/v1/usage",
        params={"start": "2026-11-02T00:00:00Z", "end": "2026-11-01T00:00:00Z"},
    )
    assert "end" in _field_errors(backwards)
    ok = call(
        server,
        fleet["partner"],
        "GET",
        "/v1/usage",
        params={"start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z"},
    )
    assert ok.status_code == 200 and ok.json()["total_gpu_seconds"] == 0


def test_admins_manage_providers_agreements_and_tokens(server, fleet) -> None:  # type: ignore[no-untyped-def]
    admin = fleet["admin"]
    assert call(server, admin, "POST", "/v1/providers", json={"name": "nebula"}).status_code == 201
    assert call(server, admin, "POST", "/v1/providers", json={"name": "nebula"}).status_code == 409
    ag = call(
        server,
        admin,
        "POST",
        "/v1/providers/nebula/agreements",
        json={"level": "committed", "committed_gpu_hours_per_month": 5000},
    )
    assert ag.status_code == 201 and ag.json()["version"] == 1
    ag2 = call(
        server, admin, "POST", "/v1/providers/nebula/agreements", json={"level": "committed"}
    )
    assert ag2.json()["version"] == 2
    tok = call(server, admin, "POST", "/v1/tokens", json={"name": "n", "role": "provider"})
    assert "provider" in _field_errors(tok)
    tok = call(
        server,
        admin,
        "POST",
        "/v1/tokens",
        json={"name": "n", "role": "provider", "provider": "nebula"},
    )
    assert tok.status_code == 201 and tok.json()["token"].startswith("andr_")


def test_the_openapi_schema_describes_the_v1_api(server) -> None:  # type: ignore[no-untyped-def]
    schema = httpx.get(server.url + "/openapi.json").json()
    paths = set(schema["paths"])
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/logs",
        "/v1/nodes/register",
        "/v1/nodes/{name}/heartbeat",
        "/v1/usage",
    } <= paths
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_a_change_is_committed_before_its_response_is_sent(server, fleet, session_of) -> None:  # type: ignore[no-untyped-def]
    """A client that got its answer must find the change visible to everyone else (the
    scheduler loop included): the transaction commits before the response goes out."""
    for _ in range(30):
        job = call(server, fleet["engineer"], "POST", "/v1/jobs", json=GOOD_JOB).json()
        call(server, fleet["engineer"], "POST", f"/v1/jobs/{job['id']}/cancel")
        with session_of() as s:
            assert s.get(Job, job["id"]).status == "cancelled"  # type: ignore[union-attr]


def _gpu(name: str = "NVIDIA H100 80GB HBM3", uuid: str = "GPU-n-0") -> dict[str, Any]:
    return {"uuid": uuid, "index": 0, "name": name, "memory_total_bytes": 85_520_809_984}


@pytest.mark.parametrize(
    ("who", "method", "path", "body", "field"),
    [
        (
            "admin",
            "POST",
            "/v1/providers/orion/agreements",
            {"level": "spot", "starts_at": "2026-01-01T00:00:00"},
            "starts_at",
        ),
        (
            "admin",
            "POST",
            "/v1/providers/orion/agreements",
            {"level": "spot", "committed_gpus": 2**40},
            "committed_gpus",
        ),
        (
            "orion",
            "POST",
            "/v1/nodes/register",
            {"name": "n2", "cpu_count": 2**40, "gpus": [_gpu(uuid="GPU-n2-0")]},
            "cpu_count",
        ),
        (
            "orion",
            "POST",
            "/v1/nodes/register",
            {"name": "n3", "memory_bytes": 2**64, "gpus": [_gpu(uuid="GPU-n3-0")]},
            "memory_bytes",
        ),
        (
            "orion",
            "POST",
            "/v1/nodes/orion-1/heartbeat",
            {"gpus": [{"uuid": "GPU-orion-1-0", "energy_mj": 2**64}]},
            "gpus.0.energy_mj",
        ),
        ("engineer", "POST", "/v1/jobs", {**GOOD_JOB, "entrypoint": "python\u0000x"}, "entrypoint"),
        ("engineer", "POST", "/v1/jobs", {**GOOD_JOB, "env": {"A": "x\u0000"}}, "env"),
        ("partner", "GET", "/v1/usage?end=0001-01-01T00:00:00Z", None, "end"),
        ("engineer", "GET", f"/v1/jobs/{2**63}", None, "job_id"),
        ("admin", "DELETE", f"/v1/tokens/{2**63}", None, "token_id"),
    ],
)
def test_values_the_database_cannot_hold_get_a_422_not_a_500(
    server, fleet, who, method, path, body, field
) -> None:  # type: ignore[no-untyped-def]
    resp = call(server, fleet[who], method, path, json=body)
    assert resp.status_code == 422, resp.text
    fields = {".".join(str(p) for p in e["loc"][1:]) for e in resp.json()["detail"]}
    assert field in fields, fields


def test_a_very_long_gpu_name_is_registered_with_a_bounded_model_name(server, fleet) -> None:  # type: ignore[no-untyped-def]
    body = {"name": "n4", "gpus": [_gpu(name="Acme " + "Z" * 100, uuid="GPU-n4-0")]}
    resp = call(server, fleet["orion"], "POST", "/v1/nodes/register", json=body)
    assert resp.status_code == 200, resp.text
    assert 0 < len(resp.json()["node"]["gpus"][0]["model"]) <= 64
