"""A whole Andromeda installation on one machine, from real parts: a Ray head, the control
plane as a server process on SQLite, and agent processes that each join Ray as a labelled
worker node. ``andromeda demo`` and ``scripts/gpu_check.py`` drive it; everything it starts,
``close()`` stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from agents.raynode import RayNode
from scheduler.client import ApiClient
from scheduler.db.engine import make_engine, session_scope
from scheduler.db.migrate import upgrade
from scheduler.domain.enums import Role
from scheduler.services.tokens import create_token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalStack:
    def __init__(self, data_dir: Path, *, say: Callable[[str], None]) -> None:
        self.data_dir = data_dir
        self.logs = data_dir / "logs"
        self.say = say
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.head: RayNode | None = None
        self.env: dict[str, str] = {}
        self.server_url = ""
        self.admin: ApiClient | None = None

    # --- start ---------------------------------------------------------------------------
    def start(self) -> ApiClient:
        """Fresh data dir, Ray head, control plane; returns an admin client."""
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.logs.mkdir(parents=True)
        db_url = f"sqlite:///{(self.data_dir / 'andromeda.db').resolve()}"
        self.say(f"fresh data dir {self.data_dir}/ (logs in {self.logs}/)")
        self.head = RayNode(
            address=None, head_port=free_port(), num_cpus=1, log_path=self.logs / "ray-head.log"
        )
        self.head.start()
        self.say(f"Ray head up at {self.head.gcs_address}")
        upgrade(db_url)
        with session_scope(make_engine(db_url)) as session:
            _, secret = create_token(session, name="local-admin", role=Role.admin)
        port = free_port()
        self.server_url = f"http://127.0.0.1:{port}"
        self.env = dict(
            os.environ,
            DATABASE_URL=db_url,
            RAY_ADDRESS=self.head.gcs_address,
            ANDROMEDA_SCHEDULER_INTERVAL_S="1",
            ANDROMEDA_HEARTBEAT_INTERVAL_S="2",
            ANDROMEDA_NODE_LOST_AFTER_S="20",
            PYTHONUNBUFFERED="1",
        )
        self._spawn("server", ["server", "--port", str(port), "--log-level", "warning"], self.env)
        self.admin = ApiClient(self.server_url, secret)
        admin = self.admin
        self.wait(lambda: admin.request("GET", "/healthz") is not None, 60, "control plane")
        self.say(f"control plane up at {self.server_url} (SQLite {db_url[len('sqlite:///') :]})")
        return admin

    def add_provider(self, name: str, display_name: str, level: str) -> str:
        """Create a provider with one agreement; returns a provider token for its agents."""
        assert self.admin is not None
        api = self.admin
        api.request("POST", "/v1/providers", json={"name": name, "display_name": display_name})
        api.request("POST", f"/v1/providers/{name}/agreements", json={"level": level})
        body = {"name": f"{name}-agent", "role": "provider", "provider": name}
        return str(api.request("POST", "/v1/tokens", json=body)["token"])

    def token(self, role: Role, name: str) -> str:
        assert self.admin is not None
        body = {"name": name, "role": role.value}
        return str(self.admin.request("POST", "/v1/tokens", json=body)["token"])

    def start_agent(
        self, node: str, provider_token: str, *, simulate: str | None, ray_cpus: int = 2
    ) -> None:
        """Start one agent (simulated GPUs, or NVML when ``simulate`` is None) and wait until
        its Ray worker has joined. Agents are started one at a time: Ray workers on one host
        pick their ports at start and can collide when several start at once."""
        assert self.head is not None and self.admin is not None
        args = [
            "agent",
            "--server",
            self.server_url,
            "--name",
            node,
            "--ray-address",
            self.head.gcs_address,
            "--ray-num-cpus",
            str(ray_cpus),
            "--ray-log",
            str(self.logs / f"ray-{node}.log"),
        ]
        if simulate:
            args += ["--simulate", simulate]
        self._spawn(f"agent-{node}", args, dict(self.env, ANDROMEDA_TOKEN=provider_token))
        admin = self.admin
        self.wait(
            lambda: any(n.name == node and n.ray_joined for n in admin.nodes()), 120, f"node {node}"
        )

    # --- helpers -------------------------------------------------------------------------
    def wait(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``check`` until true; fail early, naming the log, if a process died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (ConnectionError, OSError):
                pass
            dead = [name for name, p in self.procs if p.poll() is not None]
            if dead:
                raise click.ClickException(f"{dead[0]} exited early; see {self.logs}/{dead[0]}.log")
            time.sleep(0.5)
        raise click.ClickException(f"{what} not ready in {timeout_s:.0f}s; see {self.logs}/")

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        with open(self.logs / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append((name, proc))

    def close(self) -> None:
        """Stop agents (and so their Ray workers), the server, then the Ray head."""
        if self.admin is not None:
            self.admin.close()
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                click.echo(f"{name} did not stop in 30s; killing it", err=True)
                os.killpg(proc.pid, signal.SIGKILL)
        if self.head is not None:
            self.head.stop()
