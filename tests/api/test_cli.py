"""The engineer's and partner manager's commands against the real server over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from scheduler.cli.main import cli
from scheduler.domain.enums import CommitmentLevel, Role
from tests import factories as f
from tests.conftest import REPO


@pytest.fixture
def env(server, session_of) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "orion-1", gpus=4)
        f.ensure_model_version(s, "m:v1")
        return {
            "ANDROMEDA_SERVER": server.url,
            "ANDROMEDA_TOKEN": f.token(s, Role.engineer),
            "PARTNER": f.token(s, Role.partner_manager),
            "ADMIN": f.token(s, Role.admin),
        }


def run(env: dict[str, str], *args: str, token: str | None = None):  # type: ignore[no-untyped-def]
    e = {
        "ANDROMEDA_SERVER": env["ANDROMEDA_SERVER"],
        "ANDROMEDA_TOKEN": token or env["ANDROMEDA_TOKEN"],
    }
    return CliRunner().invoke(cli, list(args), env=e)


def test_submit_list_show_and_cancel_a_job(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "job.yaml"
    spec.write_text("name: t1\nmodel: m:v1\nentrypoint: echo hi\npriority: low\nworking_dir: .\n")
    out = run(env, "submit", str(spec))
    assert out.exit_code == 0, out.output
    assert "code: " in out.stderr and "1 files" in out.stderr and "(uploaded)" in out.stderr
    job_id = out.stdout.split()[1]
    listed = run(env, "jobs")
    assert "t1" in listed.output and "pending" in listed.output
    shown = run(env, "job", job_id)
    assert f"job {job_id}: t1  (pending)" in shown.output
    assert "waiting:     queued; this control plane runs no scheduler" in shown.output
    cancelled = run(env, "cancel", job_id)
    assert cancelled.output.strip() == f"job {job_id} cancelled"
    again = run(env, "cancel", job_id)
    assert again.exit_code == 1 and "HTTP 409" in again.output


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("name: t\nmodel: m:v1\n", "entrypoint: required, but missing"),
        (
            "name: t\nmodel: m:v1\nentrypoint: x\ngpus_per_worker: 0\n",
            "gpus_per_worker: must be at least 1 (got 0)",
        ),
        (
            "name: t\nmodel: m:v1\nentrypoint: x\npriority: asap\n",
            "priority: must be one of 'critical', 'high', 'normal' or 'low' (got 'asap')",
        ),
        (
            "name: t\nmodel: m:v1\nentrypoint: x\ngpus: 2\n",
            "gpus: unknown field; did you mean gpus_per_worker?",
        ),
        (
            "name: t\nmodel: m:v1\nentrypoint: x\ngpu: {modle: H100}\n",
            "gpu.modle: unknown field; did you mean model?",
        ),
        (
            "name: Big_Job\nmodel: m:v1\nentrypoint: x\n",
            "name: must be a lower-case DNS label: letters, digits and '-'",
        ),
        ("name: t\nmodel: m:v1\nentrypoint: x\nworkers: two\n", "workers: must be a whole number"),
        ("- just\n- a list\n", "expected a mapping"),
        ("name: [unclosed\n", 'bad.yaml", line 2'),
    ],
)
def test_submit_rejects_a_bad_spec_before_sending_it_and_says_why(
    env, tmp_path: Path, yaml_text, message
) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml_text)
    out = run(env, "submit", str(spec))
    assert out.exit_code == 1
    assert message in out.output
    assert "t" not in run(env, "jobs").output.split("\n", 1)[-1]


def test_the_server_names_a_fleet_problem_the_spec_alone_cannot_show(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "big.yaml"
    spec.write_text("name: big\nmodel: m:v1\nentrypoint: x\ngpus_per_worker: 16\n")
    out = run(env, "submit", str(spec))
    assert out.exit_code == 1
    assert "HTTP 422: gpus_per_worker: 16 GPUs per worker, but the largest node has 4" in out.output


def test_a_gpu_model_the_fleet_never_had_is_refused_unless_it_is_about_to_join(
    env, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "b200.yaml"
    spec.write_text("name: b200\nmodel: m:v1\nentrypoint: x\ngpu: {model: B200}\n")
    out = run(env, "submit", str(spec))
    assert out.exit_code == 1
    assert "gpu.model: no node of the fleet has ever had B200 GPUs (the fleet has H100-80GB)" in (
        out.output
    )
    assert "--allow-unknown-model" in out.output
    accepted = run(env, "submit", "--allow-unknown-model", str(spec))
    assert accepted.exit_code == 0, accepted.output


def test_a_gang_no_site_could_hold_is_refused_unless_capacity_is_about_to_join(
    env, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "huge.yaml"
    spec.write_text("name: huge\nmodel: m:v1\nentrypoint: x\nworkers: 1000\n")
    out = run(env, "submit", str(spec))
    assert out.exit_code == 1
    assert "workers: 1000 workers x 1 GPUs, but the largest site can hold 4 such workers" in (
        out.output
    )
    assert run(env, "submit", "--allow-oversize", str(spec)).exit_code == 0


def test_the_api_explains_unknown_fields_with_the_nearest_valid_one(env) -> None:  # type: ignore[no-untyped-def]
    import httpx

    r = httpx.post(
        f"{env['ANDROMEDA_SERVER']}/v1/jobs",
        json={"name": "t", "model": "m:v1", "entrypoint": "x", "worker": 2},
        headers={"Authorization": f"Bearer {env['ANDROMEDA_TOKEN']}"},
    )
    assert r.status_code == 422
    (item,) = r.json()["detail"]
    assert item["loc"] == ["body", "worker"]
    assert item["msg"] == "unknown field; did you mean workers?"


def test_every_example_job_spec_is_valid(env) -> None:  # type: ignore[no-untyped-def]
    from scheduler.cli.jobs import load_spec

    specs = sorted((REPO / "examples" / "jobs").glob("*.yaml"))
    assert len(specs) >= 4
    for path in specs:
        data = load_spec(path)
        assert Path(data["working_dir"]) == REPO, path


def test_usage_prints_a_table_with_exact_totals(env) -> None:  # type: ignore[no-untyped-def]
    out = run(env, "usage", "--by", "provider", token=env["PARTNER"])
    assert out.exit_code == 0, out.output
    assert "(no usage in this window)" in out.output
    window = run(
        env, "usage", "--start", "2026-11-01T00:00:00Z", "--end", "2026-12-01", token=env["PARTNER"]
    )
    assert "GPU usage [2026-11-01T00:00:00Z .. 2026-12-01T00:00:00Z)" in window.output
    relative = run(env, "usage", "--start", "7d", token=env["PARTNER"])
    assert relative.exit_code == 0, relative.output
    bad = run(env, "usage", "--start", "last tuesday", token=env["PARTNER"])
    assert bad.exit_code == 2 and "use ISO 8601" in bad.output
    assert "total: 0 GPU-seconds = 0.0000 GPU-hours" in out.output
    denied = run(env, "usage")  # an engineer token may not read provider usage
    assert denied.exit_code == 1 and "HTTP 403" in denied.output


def test_nodes_and_node_drain(env) -> None:  # type: ignore[no-untyped-def]
    out = run(env, "nodes")
    assert "orion-1" in out.output and "4xH100-80GB" in out.output
    drained = run(
        env,
        "node",
        "drain",
        "orion-1",
        "--reason",
        "maintenance",
        "--notice",
        "2m",
        token=env["ADMIN"],
    )
    assert drained.output.strip() == "node orion-1: draining"
    bad = run(env, "node", "drain", "orion-1", "--notice", "soon", token=env["ADMIN"])
    assert bad.exit_code == 2 and "'soon' is not a duration (try 90s, 10m or 1h)" in bad.output
    wrong = run(env, "node", "cordon", "orion-1", "--notice", "5m", token=env["ADMIN"])
    assert wrong.exit_code == 2 and "apply to drain only" in wrong.output
    ready = run(env, "node", "uncordon", "orion-1", token=env["ADMIN"])
    assert ready.output.strip() == "node orion-1: ready"


def test_an_unreachable_server_gives_one_readable_line(tmp_path: Path) -> None:
    out = CliRunner().invoke(
        cli, ["jobs"], env={"ANDROMEDA_SERVER": "http://127.0.0.1:9", "ANDROMEDA_TOKEN": "x"}
    )
    assert out.exit_code == 1
    assert "cannot reach http://127.0.0.1:9" in out.output and "andromeda server" in out.output


def test_a_local_token_says_which_database_it_was_written_to(tmp_path: Path) -> None:
    db = tmp_path / "cp.db"
    out = CliRunner().invoke(
        cli,
        ["token", "create", "--local", "--role", "admin", "--name", "ops"],
        env={"DATABASE_URL": f"sqlite:///{db}"},
    )
    assert out.exit_code == 0, out.output
    assert f"token written to sqlite:///{db}" in out.output
    assert out.stdout.strip().startswith("andr_") and "\n" not in out.stdout.strip()


def test_times_parse_in_every_documented_form() -> None:
    from datetime import UTC, datetime

    from scheduler.cli.times import fmt_time, parse_when

    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert parse_when("2026-11-01T00:00:00Z") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_when("2026-11-01T01:00:00+01:00") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_when("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_when("7d", now=now) == datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_when("90s", now=now) == datetime(2026, 12, 3, 11, 58, 30, tzinfo=UTC)
    assert parse_when("now", now=now) == now
    assert fmt_time(datetime(2026, 11, 1, 1, 2, 3, 999, tzinfo=UTC)) == "2026-11-01T01:02:03Z"
    with pytest.raises(ValueError, match="not a time"):
        parse_when("soon")


def test_the_server_refuses_a_bad_policy_config_in_a_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("min_runtime: 5\n")
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cp.db'}", "ANDROMEDA_POLICY_CONFIG": str(bad)}
    out = CliRunner().invoke(cli, ["server", "--port", "1"], env=env)
    assert out.exit_code == 1
    assert (
        "ANDROMEDA_POLICY_CONFIG" in out.output
        and "unknown policy setting min_runtime" in out.output
    )
    assert "Traceback" not in out.output
    env["ANDROMEDA_POLICY_CONFIG"] = str(tmp_path / "missing.yaml")
    missing = CliRunner().invoke(cli, ["server", "--port", "1"], env=env)
    assert missing.exit_code == 1 and "cannot read it" in missing.output


def test_node_remove_gpu_conflicts_and_usage_by_allocation(env, session_of) -> None:  # type: ignore[no-untyped-def]
    from scheduler.schemas import GpuReport, NodeRegister
    from scheduler.services.nodes import GpuClaimConflict, record_conflicts, register_node

    with session_of() as s:  # another provider's host claims one of orion-1's GPUs
        vega = f.provider(s, "vega", CommitmentLevel.spot)
        claim = NodeRegister(
            name="vega-9",
            gpus=[GpuReport(uuid="GPU-orion-1-2", index=0, name=f.H100[0],
                            memory_total_bytes=f.H100[1])],
        )  # fmt: skip
        with pytest.raises(GpuClaimConflict) as refused:
            register_node(s, provider_id=vega.id, body=claim, now=f.utcnow())  # type: ignore[arg-type]
        record_conflicts(s, error=refused.value, now=f.utcnow())
    listed = run(env, "gpu-conflicts", token=env["ADMIN"])
    assert listed.exit_code == 0, listed.output
    assert "GPU-orion-1-2" in listed.output and "vega-9 (vega)" in listed.output
    undecided = run(env, "gpu-conflicts", "resolve", "1", token=env["ADMIN"])
    assert undecided.exit_code == 2 and "say --release or --dismiss" in undecided.output
    dismissed = run(env, "gpu-conflicts", "resolve", "1", "--dismiss", token=env["ADMIN"])
    assert dismissed.output.strip() == "GPU conflict 1 (GPU-orion-1-2): claim dismissed"
    nodes = run(env, "nodes")
    assert nodes.output.splitlines()[1].split()[-1] == "ok"  # the HEALTH column
    removed = run(env, "node", "remove", "orion-1", token=env["ADMIN"])
    assert removed.output.strip() == "node orion-1: retired"
    per_alloc = run(env, "usage", "--by", "allocation", token=env["PARTNER"])
    assert per_alloc.exit_code == 0 and "(no usage in this window)" in per_alloc.output
