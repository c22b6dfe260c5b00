"""The agent command against the real server over HTTP: real NVML recordings (H100, H200)
replayed through the stand-in pynvml, and simulated GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from scheduler.cli.main import cli
from scheduler.client import ApiClient
from scheduler.domain.enums import CommitmentLevel, Role
from tests import factories as f

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"


@pytest.fixture
def tokens(session_of) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with session_of() as s:
        f.provider(s, "orion", CommitmentLevel.committed)
        return {
            "orion": f.token(s, Role.provider, "orion"),
            "partner": f.token(s, Role.partner_manager),
        }


def _agent(server, token: str, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(
        cli, ["agent", "--server", server.url, "--token", token, "--once", *args]
    )


@pytest.mark.parametrize(
    ("recording", "model"), [("h100-80gb-hbm3", "H100-80GB"), ("h200-141gb", "H200-141GB")]
)
def test_an_agent_replaying_real_nvml_registers_the_recorded_gpu(
    server, tokens, recording, model
) -> None:  # type: ignore[no-untyped-def]
    snapshot = json.loads((FIXTURES / recording / "nvml_snapshot.json").read_text())
    uuid = snapshot["devices"][0]["queries"]["nvmlDeviceGetUUID"]
    result = _agent(
        server, tokens["orion"], "--name", "gpu-host-1", "--replay", str(FIXTURES / recording)
    )
    assert result.exit_code == 0, result.output
    assert f"node gpu-host-1 (orion, site orion, committed): 1 GPU(s) {model}" in result.output
    with ApiClient(server.url, tokens["partner"]) as api:
        (node,) = api.nodes()
    (gpu,) = node.gpus
    assert gpu.uuid == uuid and gpu.model == model and gpu.health.value == "ok"
    assert gpu.memory_bytes == snapshot["devices"][0]["queries"]["nvmlDeviceGetMemoryInfo"]["total"]


def test_a_simulated_agent_registers_its_gpus(server, tokens) -> None:  # type: ignore[no-untyped-def]
    result = _agent(server, tokens["orion"], "--name", "sim-1", "--simulate", "8xH100-80GB")
    assert result.exit_code == 0, result.output
    with ApiClient(server.url, tokens["partner"]) as api:
        (node,) = api.nodes()
    assert len(node.gpus) == 8 and {g.model for g in node.gpus} == {"H100-80GB"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--simulate", "4xH100"], "expected COUNTxMODEL-MEMGB"),
        (["--simulate", "0xH100-80GB"], "count must be 1..16, got 0"),
        (["--name", "Bad_Name", "--simulate", "1xH100-80GB"], "not a lower-case DNS label"),
    ],
)
def test_an_agent_with_bad_options_says_what_is_wrong(server, tokens, args, message) -> None:  # type: ignore[no-untyped-def]
    result = _agent(server, tokens["orion"], *args)
    assert result.exit_code != 0
    assert message in result.output


def test_an_agent_with_an_unknown_token_fails_with_a_readable_error(server, tokens) -> None:  # type: ignore[no-untyped-def]
    result = _agent(server, "andr_wrong", "--simulate", "1xH100-80GB", "--name", "n1")
    assert result.exit_code == 1
    assert "HTTP 401: unknown or revoked token" in result.output


@pytest.mark.parametrize("command", ["agent", "site-agent"])
def test_agents_refuse_to_send_their_token_over_plain_http_to_another_host(command: str) -> None:
    args = ["--server", "http://10.20.30.40:8700", "--token", "t"]
    extra = ["--name", "n1", "--simulate", "1xH100-80GB", "--once"]
    if command == "site-agent":
        extra = ["--site", "s", "--ray-address", "127.0.0.1:1", "--ray-token-file", "/dev/null"]
    out = CliRunner().invoke(cli, [command, *args, *extra])
    assert out.exit_code == 2
    assert "refusing to send the provider token over plain HTTP to 10.20.30.40" in out.output
    assert "--insecure" in out.output
    bad = CliRunner().invoke(cli, [command, "--server", "ftp://x", "--token", "t", *extra])
    assert bad.exit_code == 2 and "'ftp://x' is not an http(s) URL" in bad.output


def test_plain_http_to_this_host_or_with_insecure_is_allowed(server, tokens) -> None:  # type: ignore[no-untyped-def]
    assert server.url.startswith("http://127.0.0.1")
    out = _agent(server, tokens["orion"], "--name", "local-1", "--simulate", "1xH100-80GB")
    assert out.exit_code == 0, out.output
    insecure = CliRunner().invoke(
        cli,
        [
            "agent",
            "--insecure",
            "--server",
            server.url,
            "--token",
            tokens["orion"],
            "--once",
            "--name",
            "local-2",
            "--simulate",
            "1xH100-80GB",
        ],
    )
    assert insecure.exit_code == 0, insecure.output


def test_an_agent_replaying_real_nvml_sends_the_gpus_details(server, tokens, session_of) -> None:  # type: ignore[no-untyped-def]
    from sqlmodel import select

    from scheduler.db.models import Gpu, Node

    recording = FIXTURES / "h100-80gb-hbm3"
    snapshot = json.loads((recording / "nvml_snapshot.json").read_text())
    queries = snapshot["devices"][0]["queries"]
    result = _agent(server, tokens["orion"], "--name", "gpu-host-1", "--replay", str(recording))
    assert result.exit_code == 0, result.output
    server.app.state.heartbeats.flush_samples()  # metrics are written every few seconds
    with session_of() as s:
        node = s.exec(select(Node).where(Node.name == "gpu-host-1")).one()
        (gpu,) = s.exec(select(Gpu).where(Gpu.node_id == node.id)).all()
        assert node.cuda_driver_version == "13.0"  # nvmlSystemGetCudaDriverVersion 13000
        assert gpu.compute_capability == "9.0"
        assert gpu.pci_bus_id == queries["nvmlDeviceGetPciInfo"]["busId"]
        assert gpu.serial == str(queries["nvmlDeviceGetSerial"])
        assert gpu.mig_enabled is False
        assert gpu.process_count == 0  # nvmlDeviceGetComputeRunningProcesses: []
        assert node.clock_skew_ms is not None  # the heartbeat carried the agent's clock


def test_the_agent_command_offers_the_spool_and_drain_options() -> None:
    out = CliRunner().invoke(cli, ["agent", "--help"])
    assert out.exit_code == 0
    for option in ("--spool-path", "--spool-max-mb", "--drain-timeout"):
        assert option in out.output
    bad = CliRunner().invoke(
        cli, ["agent", "--server", "http://127.0.0.1:1", "--token", "t", "--spool-max-mb", "0"]
    )
    assert bad.exit_code == 2 and "--spool-max-mb" in bad.output
