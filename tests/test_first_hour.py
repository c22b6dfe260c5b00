"""What a new user meets in the first hour, checked as they would meet it: installing, the
server's start and stop, an agent pointed at the wrong address, and the demo itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from scheduler.cli.main import cli
from tests.conftest import REPO, free_port


def test_building_the_package_prints_no_warning_from_its_own_metadata(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-cache-dir",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "BuildBackendWarning" not in text and "deprecated" not in text.lower(), text


def test_no_program_writes_to_a_fixed_shared_temporary_path() -> None:
    """Two clones on one host must not clobber each other's scratch."""
    found = subprocess.run(
        [
            "git",
            "grep",
            "-nE",
            r"[\"' =]/tmp/",
            "--",
            "scheduler",
            "agents",
            "examples",
            "scripts",
            "bench",
            "Makefile",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert found.returncode == 1, f"fixed /tmp paths:\n{found.stdout}"


def test_the_server_names_its_database_is_quiet_per_request_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    port = free_port()
    db = tmp_path / "cp.db"
    env = dict(os.environ, DATABASE_URL=f"sqlite:///{db}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler", "server", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        for _ in range(5):
            httpx.get(f"http://127.0.0.1:{port}/v1/jobs")  # 401s: not worth a log line
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    # uvicorn re-raises the signal once it has shut down, as servers conventionally do
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert f"database sqlite:///{db}" in output
    assert "Traceback" not in output and "ERROR" not in output, output
    assert "GET /v1/jobs" not in output, "requests are logged only at debug"


def test_an_agent_pointed_at_an_unreachable_ray_head_fails_at_once_and_says_where(
    server, session_of, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from scheduler.domain.enums import CommitmentLevel, Role
    from tests import factories as f

    with session_of() as s:
        f.provider(s, "orion", CommitmentLevel.reserved)
        token = f.token(s, Role.provider, "orion")
    (tmp_path / "ray-token").write_text("x")
    t0 = time.monotonic()
    result = CliRunner().invoke(
        cli,
        [
            "agent",
            "--simulate",
            "1xH100-80GB",
            "--name",
            "n1",
            "--data-dir",
            str(tmp_path),
            "--ray-address",
            f"127.0.0.1:{free_port()}",
            "--ray-token-file",
            str(tmp_path / "ray-token"),
        ],
        env={"ANDROMEDA_SERVER": server.url, "ANDROMEDA_TOKEN": token},
    )
    assert result.exit_code == 1
    assert "error: cannot reach Ray at 127.0.0.1:" in result.output
    assert "andromeda server" not in result.output
    assert time.monotonic() - t0 < 30


@pytest.mark.ray
def test_the_demo_completes_every_job_and_stops_without_a_traceback(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    out = subprocess.run(
        [sys.executable, "-m", "scheduler", "demo", "--data-dir", str(data)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "done: 4 of 4 jobs completed" in out.stdout
    assert "resuming:" in out.stdout, "the preempted sweep resumed from its checkpoint"
    assert "GPU-hours per provider" in out.stdout
    assert "orion-dc's statement for" in out.stdout and "revenue_share" in out.stdout
    for log in (data / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "SIGTERM received" not in text, (log, text[-2000:])
    assert not (data / "stack.json").exists(), "everything the demo started is stopped"
