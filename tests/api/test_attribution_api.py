"""Lineage, revenue and statements through the real API and CLI: who may do what, and what
a partner manager, an engineer and a provider each see."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from scheduler.cli.main import cli
from scheduler.domain.enums import CommitmentLevel, JobStatus, Role
from scheduler.services.transitions import transition_job
from tests import factories as f

T = datetime.now(UTC) - timedelta(days=70)  # a long-finished month of real time
T = T.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
PERIOD = T.strftime("%Y-%m")


@pytest.fixture
def world(server, session_of):  # type: ignore[no-untyped-def]
    with session_of() as s:
        a = f.provider(s, "orion", CommitmentLevel.reserved, starts_at=T - timedelta(days=30))
        f.provider(s, "vega", CommitmentLevel.spot, starts_at=T - timedelta(days=30))
        node = f.node(s, a, "orion-1", gpus=2, now=T)
        f.ensure_model_version(s, "lm:v1")
        job = f.job(s, "train", gpus_per_worker=2, model="lm:v1", now=T)
        f.run(s, job, node, T + timedelta(hours=1))
        transition_job(s, job_id=job.id, to=JobStatus.completed, now=T + timedelta(hours=3))
        return {
            "url": server.url,
            "admin": f.token(s, Role.admin),
            "engineer": f.token(s, Role.engineer),
            "partner": f.token(s, Role.partner_manager),
            "orion": f.token(s, Role.provider, "orion"),
            "vega": f.token(s, Role.provider, "vega"),
        }


def call(world, who: str, method: str, path: str, **kw):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {world[who]}"}
    return httpx.request(method, world["url"] + path, headers=headers, timeout=30, **kw)


def cli_as(world, who: str, *args: str):  # type: ignore[no-untyped-def]
    env = {"ANDROMEDA_SERVER": world["url"], "ANDROMEDA_TOKEN": world[who]}
    return CliRunner().invoke(cli, list(args), env=env)


def _event(key: str, amount: str = "100", **kw: object) -> dict[str, object]:
    return {
        "key": key,
        "stream": "api_usage",
        "model": "lm:v1",
        "amount": amount,
        "occurred_at": (T + timedelta(days=2)).isoformat(),
        **kw,
    }


def test_models_are_registered_with_their_lineage_and_show_the_hours_behind_them(world) -> None:  # type: ignore[no-untyped-def]
    out = cli_as(world, "engineer", "model", "create", "lm", "--version", "v2", "--parent", "lm:v1")
    assert out.exit_code == 0, out.output
    assert "model version lm:v2 registered (from lm:v1)" in out.output
    listed = cli_as(world, "engineer", "model", "list")
    assert "lm:v1" in listed.output and "lm:v2" in listed.output
    shown = cli_as(world, "partner", "model", "show", "lm:v1")
    assert "orion" in shown.output and "14400" in shown.output and "yes" in shown.output
    hours = call(world, "engineer", "GET", "/v1/models/lm/versions/v2/hours").json()
    assert hours["ancestors"] == ["lm:v1"] and hours["rows"] == []
    again = cli_as(world, "engineer", "model", "create", "lm", "--version", "v2")
    assert again.exit_code == 1 and "already exists" in again.output


def test_a_job_naming_an_unregistered_model_version_gets_a_422_that_says_how_to_register(
    world,
) -> None:  # type: ignore[no-untyped-def]
    body = {"name": "t", "model": "lm:v7", "entrypoint": "true"}
    r = call(world, "engineer", "POST", "/v1/jobs", json=body)
    assert r.status_code == 422
    (item,) = r.json()["detail"]
    assert item["loc"] == ["body", "model"]
    assert "unknown model version lm:v7: model lm has versions v1" in item["msg"]
    assert "andromeda model create lm --version v7" in item["msg"]
    bad = call(world, "engineer", "POST", "/v1/jobs", json={**body, "model": "no version"})
    assert "write name:version" in bad.json()["detail"][0]["msg"]


def test_a_revenue_event_is_recorded_once_and_a_changed_resend_is_a_409_naming_the_difference(
    world,
) -> None:  # type: ignore[no-untyped-def]
    first = call(world, "partner", "POST", "/v1/revenue-events", json=_event("e1"))
    assert first.status_code == 201 and first.json()["recorded"] == 1
    again = call(world, "partner", "POST", "/v1/revenue-events", json=_event("e1"))
    assert again.status_code == 200 and again.json()["duplicates"] == 1
    changed = call(world, "partner", "POST", "/v1/revenue-events", json=_event("e1", "120"))
    assert changed.status_code == 409
    assert "amount_micros was 100000000, now 120000000" in changed.json()["detail"]
    bad = call(world, "partner", "POST", "/v1/revenue-events", json=_event("e2", "ten"))
    assert bad.status_code == 422 and "is not an amount" in str(bad.json()["detail"])
    batch = call(
        world,
        "partner",
        "POST",
        "/v1/revenue-events",
        json=[_event("e3"), _event("e1"), {"key": "e4"}],
    ).json()
    assert [i["status"] for i in batch["items"]] == ["recorded", "duplicate", "invalid"]
    denied = call(world, "engineer", "POST", "/v1/revenue-events", json=_event("e5"))
    assert denied.status_code == 403


def test_revenue_import_reports_bad_rows_by_line_and_keeps_the_good_ones(
    world, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    when = (T + timedelta(days=3)).isoformat()
    path = tmp_path / "november.csv"
    path.write_text(
        "key,stream,occurred_at,amount,currency,model,provider,calls\n"
        f"r1,api_usage,{when},250.00,USD,lm:v1,,25000\n"
        f"r2,consulting,{when},1000,USD,,vega,\n"
        f"r3,api_usage,{when},12.3456789,USD,lm:v1,,\n"
        f"r4,licence,{when},500,USD,lm:v9,,\n"
    )
    out = cli_as(world, "partner", "revenue", "import", str(path))
    assert out.exit_code == 1
    assert "november.csv:4: invalid: amount: '12.3456789' has more than 6 decimal places" in (
        out.output
    )
    assert "november.csv:5: invalid: model: unknown model version lm:v9" in out.output
    assert "2 recorded, 0 already recorded, 2 rejected (of 4 rows)" in out.output
    again = cli_as(world, "partner", "revenue", "import", str(path))
    assert "0 recorded, 2 already recorded, 2 rejected" in again.output


def test_a_partner_manager_reviews_approves_and_an_admin_pays_a_statement(world) -> None:  # type: ignore[no-untyped-def]
    call(world, "partner", "POST", "/v1/revenue-events", json=_event("e1", "1000"))
    out = cli_as(world, "partner", "statement", "orion", "--period", PERIOD)
    assert out.exit_code == 0, out.output
    assert f"Statement of orion for {PERIOD} (draft; reward policy v1)" in out.output
    assert "4.0000 GPU-hours H100-80GB at reserved" in out.output
    assert "api_usage of lm:v1: 10% of 1000.00 USD" in out.output
    assert "total 100.000000 USD; payable 100.00 USD" in out.output
    explained = cli_as(world, "partner", "statement", "orion", "--period", PERIOD, "--explain", "2")
    assert "e1" in explained.output and "your share" in explained.output
    csv_out = cli_as(world, "partner", "statement", "orion", "--period", PERIOD, "--format", "csv")
    assert csv_out.output.startswith("line,kind,description,amount\n")

    assert (
        cli_as(world, "admin", "statement", "orion", "--period", PERIOD, "--approve").exit_code == 1
    )
    approved = cli_as(world, "partner", "statement", "orion", "--period", PERIOD, "--approve")
    assert approved.exit_code == 0 and "(approved;" in approved.output
    verified = cli_as(world, "partner", "statement", "orion", "--period", PERIOD, "--verify")
    assert verified.exit_code == 0 and "matches" in verified.output
    assert (
        cli_as(world, "partner", "statement", "orion", "--period", PERIOD, "--pay", "x").exit_code
        == 1
    )
    paid = cli_as(world, "admin", "statement", "orion", "--period", PERIOD, "--pay", "WIRE-7")
    assert paid.exit_code == 0 and "paid (WIRE-7)" in paid.output


def test_a_provider_reads_only_its_own_statement_and_an_engineer_none(world) -> None:  # type: ignore[no-untyped-def]
    assert call(world, "orion", "GET", f"/v1/statements/orion/{PERIOD}").status_code == 200
    assert call(world, "vega", "GET", f"/v1/statements/orion/{PERIOD}").status_code == 403
    assert call(world, "engineer", "GET", f"/v1/statements/orion/{PERIOD}").status_code == 403
    listed = call(world, "vega", "GET", "/v1/statements", params={"period": PERIOD}).json()
    assert [s["provider"] for s in listed] == ["vega"]
    every = call(world, "partner", "GET", "/v1/statements", params={"period": PERIOD}).json()
    assert [s["provider"] for s in every] == ["orion", "vega"]
    bad = call(world, "partner", "GET", "/v1/statements/orion/last-month")
    assert bad.status_code == 422 and "expected e.g." in str(bad.json()["detail"])


def test_a_new_reward_policy_version_applies_from_its_date(world) -> None:  # type: ignore[no-untyped-def]
    body = {
        "effective_from": (T + timedelta(days=40)).isoformat(),
        "rates": {"api_usage": "0.12"},
        "note": "launch promotion",
    }
    assert call(world, "partner", "POST", "/v1/reward-policies", json=body).status_code == 403
    created = call(world, "admin", "POST", "/v1/reward-policies", json=body)
    assert created.status_code == 201 and created.json()["version"] == 2
    wrong = call(
        world, "admin", "POST", "/v1/reward-policies", json={**body, "rates": {"api_usage": "1.5"}}
    )
    assert wrong.status_code == 422 and "between 0 and 1" in str(wrong.json()["detail"])
    st = call(world, "partner", "GET", f"/v1/statements/orion/{PERIOD}").json()
    assert st["policy_version"] == 1  # the period started before version 2
