"""Who a node is: bound to its provider and site at registration, GPUs never silently
reassigned, an admin's cordon lifted only by an admin, retired nodes kept as history.
Over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlmodel import select

from scheduler.db.models import Gpu, GpuConflict, Node
from scheduler.db.types import utcnow
from scheduler.domain.enums import CommitmentLevel, EndReason, JobStatus, Role
from scheduler.services.tokens import create_token
from scheduler.services.transitions import transition_job
from tests import factories as f

H100 = ("NVIDIA H100 80GB HBM3", 85_520_809_984)


@pytest.fixture
def fleet(session_of) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """orion with two sites (a registration token for one), vega with one, a node each."""
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved, sites=("orion-east", "orion-west"))
        vega = f.provider(s, "vega", CommitmentLevel.spot)
        f.node(s, orion, "orion-1", gpus=2, site="orion-east")
        f.node(s, vega, "vega-1", gpus=2)
        _, east = create_token(
            s, name="east-hosts", role=Role.provider, provider_name="orion", site_name="orion-east"
        )
        return {
            "admin": f.token(s, Role.admin),
            "orion": f.token(s, Role.provider, "orion"),
            "orion-east": east,
            "vega": f.token(s, Role.provider, "vega"),
        }


def call(server, token: str, method: str, path: str, **kw: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.request(method, server.url + path, headers=headers, timeout=10, **kw)


def registration(name: str, *uuids: str, site: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "gpus": [
            {"uuid": u, "index": i, "name": H100[0], "memory_total_bytes": H100[1]}
            for i, u in enumerate(uuids)
        ],
    }
    if site is not None:
        body["site"] = site
    return body


def detail(resp: httpx.Response) -> str:
    return str(resp.json()["detail"])


def test_a_provider_token_naming_a_provider_gets_a_403_that_says_so(server, fleet) -> None:  # type: ignore[no-untyped-def]
    for provider in ("vega", "orion"):  # another provider, or even its own
        resp = call(
            server,
            fleet["orion"],
            "POST",
            f"/v1/nodes/register?provider={provider}",
            json=registration("orion-2", "GPU-o2-0", site="orion-east"),
        )
        assert resp.status_code == 403, resp.text
        assert "only an admin may register a node for a provider" in detail(resp)


def test_a_gpu_registered_under_one_provider_is_a_conflict_when_another_claims_it(
    server, fleet, session_of
) -> None:  # type: ignore[no-untyped-def]
    stolen = registration("vega-2", "GPU-orion-1-0")
    for _ in range(2):
        resp = call(server, fleet["vega"], "POST", "/v1/nodes/register", json=stolen)
        assert resp.status_code == 409, resp.text
        assert "GPU-orion-1-0 is registered on another node" in detail(resp)
    with session_of() as s:
        gpu = s.exec(select(Gpu).where(Gpu.uuid == "GPU-orion-1-0")).one()
        assert s.get(Node, gpu.node_id).name == "orion-1"  # type: ignore[union-attr]
        assert s.exec(select(Node).where(Node.name == "vega-2")).first() is None
        (conflict,) = s.exec(select(GpuConflict)).all()
        assert (conflict.claimant_node, conflict.attempts) == ("vega-2", 2)
    listed = call(server, fleet["admin"], "GET", "/v1/gpu-conflicts").json()
    assert [(c["gpu_uuid"], c["registered_on"], c["claimant_provider"]) for c in listed] == [
        ("GPU-orion-1-0", "orion-1", "vega")
    ]
    assert call(server, fleet["vega"], "GET", "/v1/gpu-conflicts").status_code == 403


def test_an_admin_releasing_a_conflicted_gpu_lets_the_claimant_register_it(
    server, fleet, session_of
) -> None:  # type: ignore[no-untyped-def]
    stolen = registration("vega-2", "GPU-orion-1-1")
    assert call(server, fleet["vega"], "POST", "/v1/nodes/register", json=stolen).status_code == 409
    (conflict,) = call(server, fleet["admin"], "GET", "/v1/gpu-conflicts").json()
    path = f"/v1/gpu-conflicts/{conflict['id']}/resolve"
    resolved = call(server, fleet["admin"], "POST", path, json={"release": True, "note": "moved"})
    assert resolved.status_code == 200 and resolved.json()["resolution"] == "moved"
    again = call(server, fleet["admin"], "POST", path, json={"release": True})
    assert again.status_code == 409
    resp = call(server, fleet["vega"], "POST", "/v1/nodes/register", json=stolen)
    assert resp.status_code == 200, resp.text
    assert call(server, fleet["admin"], "GET", "/v1/gpu-conflicts").json() == []
    with session_of() as s:  # the old GPU row keeps its history under a freed UUID
        old = s.exec(select(Gpu).where(Gpu.uuid.startswith("GPU-orion-1-1~released"))).one()  # type: ignore[attr-defined]
        assert s.get(Node, old.node_id).name == "orion-1"  # type: ignore[union-attr]


def test_a_sites_registration_token_registers_only_that_sites_nodes(server, fleet) -> None:  # type: ignore[no-untyped-def]
    east = fleet["orion-east"]
    ok = call(server, east, "POST", "/v1/nodes/register", json=registration("orion-2", "GPU-o2"))
    assert ok.status_code == 200 and ok.json()["node"]["site"] == "orion-east"
    west = call(
        server,
        east,
        "POST",
        "/v1/nodes/register",
        json=registration("orion-3", "GPU-o3", site="orion-west"),
    )
    assert west.status_code == 403 and "site 'orion-east', not 'orion-west'" in detail(west)
    # a node of the other site may not be reported or drained with it
    orion_west = call(
        server,
        fleet["orion"],
        "POST",
        "/v1/nodes/register",
        json=registration("orion-4", "GPU-o4", site="orion-west"),
    )
    assert orion_west.status_code == 200
    hb = call(server, east, "POST", "/v1/nodes/orion-4/heartbeat", json={"gpus": []})
    assert hb.status_code == 403


def test_a_node_is_bound_to_its_site_and_only_an_admin_moves_it(server, fleet) -> None:  # type: ignore[no-untyped-def]
    move = registration("orion-1", "GPU-orion-1-0", "GPU-orion-1-1", site="orion-west")
    resp = call(server, fleet["orion"], "POST", "/v1/nodes/register", json=move)
    assert resp.status_code == 409 and "bound to site 'orion-east'" in detail(resp)
    by_admin = call(server, fleet["admin"], "POST", "/v1/nodes/register?provider=orion", json=move)
    assert by_admin.status_code == 200 and by_admin.json()["node"]["site"] == "orion-west"


def test_an_admins_cordon_is_lifted_only_by_an_admin(server, fleet) -> None:  # type: ignore[no-untyped-def]
    path = "/v1/nodes/orion-1/status"
    cordon = {"status": "cordoned", "reason": "suspected bad HBM"}
    resp = call(server, fleet["admin"], "POST", path, json=cordon)
    assert resp.status_code == 200 and resp.json()["status_set_by"] == "admin"
    lift = call(server, fleet["orion"], "POST", path, json={"status": "ready"})
    assert lift.status_code == 403, lift.text
    assert "cordoned by an admin (suspected bad HBM)" in detail(lift)
    drain = call(server, fleet["orion"], "POST", path, json={"status": "draining"})
    assert drain.status_code == 403
    assert call(server, fleet["orion"], "GET", "/v1/nodes/orion-1").json()["status"] == "cordoned"
    assert call(server, fleet["admin"], "POST", path, json={"status": "ready"}).status_code == 200
    # a provider's own cordon is the provider's to lift
    assert (
        call(server, fleet["orion"], "POST", path, json={"status": "cordoned"}).status_code == 200
    )
    assert call(server, fleet["orion"], "POST", path, json={"status": "ready"}).status_code == 200


def test_a_removed_node_is_retired_with_its_history_and_its_agent_refused(
    server, fleet, session_of
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        node = s.exec(select(Node).where(Node.name == "orion-1")).one()
        job = f.job(s, "busy")
        f.run(s, job, node, utcnow())
    busy = call(server, fleet["orion"], "DELETE", "/v1/nodes/orion-1")
    assert busy.status_code == 409 and "drain it first" in detail(busy)
    with session_of() as s:  # the work finishes; its GPUs are released
        node = s.exec(select(Node).where(Node.name == "orion-1")).one()
        transition_job(
            s,
            job_id=job.id,  # type: ignore[arg-type]
            to=JobStatus.completed,
            now=utcnow(),
            end_reason=EndReason.completed,
            released=True,
        )
    gone = call(server, fleet["orion"], "DELETE", "/v1/nodes/orion-1")
    assert gone.status_code == 200 and gone.json()["status"] == "retired"
    hb = call(server, fleet["orion"], "POST", "/v1/nodes/orion-1/heartbeat", json={"gpus": []})
    assert hb.status_code == 409 and "retired" in detail(hb)
    again = call(
        server,
        fleet["orion"],
        "POST",
        "/v1/nodes/register",
        json=registration("orion-1", "GPU-orion-1-0", site="orion-east"),
    )
    assert again.status_code == 409 and "register the host under a new node name" in detail(again)
    ready = call(
        server, fleet["orion"], "POST", "/v1/nodes/orion-1/status", json={"status": "ready"}
    )
    assert ready.status_code == 409
    names = {
        n["name"]: n["status"] for n in call(server, fleet["admin"], "GET", "/v1/nodes").json()
    }
    assert names["orion-1"] == "retired"  # history stays listed


def test_registration_keeps_the_full_inventory_and_labels_the_gpu_model(server, fleet) -> None:  # type: ignore[no-untyped-def]
    body = registration("vega-3", "GPU-v3-0", "GPU-v3-1")
    body["cuda_driver_version"] = "13.0"
    body["gpus"][0] |= {
        "compute_capability": "9.0",
        "pci_bus_id": "00000000:00:07.0",
        "serial": "1654123456789",
        "mig_enabled": False,
    }
    body["gpus"][1] |= {
        "mig_enabled": True,
        "mig_instances": [
            {"uuid": "MIG-1", "profile": "3g.40gb", "memory_total_bytes": 4 * 10**10}
        ],
    }
    resp = call(server, fleet["vega"], "POST", "/v1/nodes/register", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["ray_labels"]["andromeda.io/gpu-model"] == "H100-80GB"
    gpus = {g["uuid"]: g for g in resp.json()["node"]["gpus"]}
    assert gpus["GPU-v3-1"]["mig_enabled"] is True and gpus["GPU-v3-0"]["mig_enabled"] is False
    bad = registration("vega-4", "GPU-v4-0")
    bad["gpus"][0]["compute_capability"] = "nine"
    assert call(server, fleet["vega"], "POST", "/v1/nodes/register", json=bad).status_code == 422
