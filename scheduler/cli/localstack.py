"""A whole Andromeda installation on one machine, from real parts: the control plane as a
server process on SQLite, and one site per provider: a Ray cluster (token auth on) whose
head host runs ``andromeda agent --head`` and whose other hosts run ``andromeda agent
--ray-address``. ``andromeda demo``, ``andromeda up`` and ``scripts/gpu_check.py`` drive it.

Everything it starts is written to ``DATA_DIR/stack.json`` as it starts it (process ids,
Ray temporary folders), so ``close()``, or ``andromeda down`` from another shell, stops
exactly those processes and nothing else on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from scheduler.client import ApiClient
from scheduler.db.engine import make_engine, session_scope
from scheduler.db.migrate import upgrade
from scheduler.domain.enums import Role
from scheduler.processes import group_alive, signal_group
from scheduler.services.tokens import create_token

RECORD = "stack.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SiteInfo:
    name: str
    head_address: str
    token_file: Path


@dataclass
class StackRecord:
    """What the stack started, kept on disk as it goes (see the module docstring)."""

    server_url: str = ""
    admin_token: str = ""
    database_url: str = ""
    processes: dict[str, int] = field(default_factory=dict)  # name -> pid (group leader)
    ray_pid_files: list[str] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)

    def save(self, data_dir: Path) -> None:
        tmp = data_dir / (RECORD + ".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        tmp.replace(data_dir / RECORD)

    @classmethod
    def load(cls, data_dir: Path) -> StackRecord | None:
        try:
            return cls(**json.loads((data_dir / RECORD).read_text()))
        except (OSError, ValueError, TypeError):
            return None


class LocalStack:
    def __init__(self, data_dir: Path, *, say: Callable[[str], None]) -> None:
        self.data_dir = data_dir.resolve()
        self.logs = self.data_dir / "logs"
        self.say = say
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.sites: dict[str, SiteInfo] = {}
        self.env: dict[str, str] = {}
        self.server_url = ""
        self.admin: ApiClient | None = None
        self.record = StackRecord()
        self._spawn_env: dict[str, dict[str, str]] = {}

    # --- start ---------------------------------------------------------------------------
    def start(
        self,
        *,
        heartbeat_interval_s: int = 2,
        node_lost_after_s: int = 20,
        report_interval_s: float = 2,
        database_url: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> ApiClient:
        """Fresh data dir, control plane (on SQLite in the data dir unless
        ``database_url``); returns an admin client."""
        if self.data_dir.exists():
            stop_recorded(self.data_dir)  # a stack left running from this data dir
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.logs.mkdir(parents=True)
        db_url = database_url or f"sqlite:///{self.data_dir / 'andromeda.db'}"
        self.say(f"fresh data dir {self.data_dir}/ (logs in {self.logs}/)")
        upgrade(db_url)
        with session_scope(make_engine(db_url)) as session:
            _, secret = create_token(session, name="local-admin", role=Role.admin)
        port = free_port()
        self.server_url = f"http://127.0.0.1:{port}"
        self.env = dict(
            os.environ,
            DATABASE_URL=db_url,
            ANDROMEDA_SCHEDULER_INTERVAL_S="1",
            ANDROMEDA_HEARTBEAT_INTERVAL_S=str(heartbeat_interval_s),
            ANDROMEDA_NODE_LOST_AFTER_S=str(node_lost_after_s),
            ANDROMEDA_SITE_REPORT_INTERVAL_S=str(report_interval_s),
            PYTHONUNBUFFERED="1",
            **(extra_env or {}),
        )
        self.env.pop("ANDROMEDA_TOKEN", None)
        self.record.server_url = self.server_url
        self.record.admin_token = secret
        self.record.database_url = db_url
        self._spawn("server", ["server", "--port", str(port), "--log-level", "info"], self.env)
        self.admin = ApiClient(self.server_url, secret)
        admin = self.admin
        self.wait(lambda: admin.request("GET", "/healthz") is not None, 60, "control plane")
        where = (
            "SQLite " + str(self.data_dir / "andromeda.db") if database_url is None else "its DB"
        )
        self.say(f"control plane up at {self.server_url} ({where})")
        return admin

    def add_provider(self, name: str, display_name: str, level: str, *, site: str) -> str:
        """A provider with one agreement and one site; returns a token for its agents."""
        assert self.admin is not None
        api = self.admin
        api.request("POST", "/v1/providers", json={"name": name, "display_name": display_name})
        api.request("POST", f"/v1/providers/{name}/agreements", json={"level": level})
        api.request("POST", f"/v1/providers/{name}/sites", json={"name": site})
        body = {"name": f"{name}-agent", "role": "provider", "provider": name}
        return str(api.request("POST", "/v1/tokens", json=body)["token"])

    def token(self, role: Role, name: str) -> str:
        assert self.admin is not None
        body = {"name": name, "role": role.value}
        return str(self.admin.request("POST", "/v1/tokens", json=body)["token"])

    def start_agent(
        self,
        node: str,
        provider_token: str,
        *,
        site: str,
        simulate: str | None,
        ray_cpus: int = 2,
        wait: bool = True,
    ) -> None:
        """Start one agent (simulated GPUs, or NVML when ``simulate`` is None). The first
        agent of a site starts its Ray head (``--head``), later ones join it. Waits until
        the site reports the node's Ray worker alive. Agents start one at a time: Ray
        processes on one host pick their ports at start and can collide otherwise."""
        assert self.admin is not None
        node_dir = self.data_dir / "nodes" / node
        ray_tmp = Path(tempfile.mkdtemp(prefix=f"andr-{node[:12]}-"))  # short: socket paths
        self.record.temp_dirs.append(str(ray_tmp))
        self.record.ray_pid_files.append(str(node_dir / "ray.pid"))
        args = [
            "agent",
            "--server",
            self.server_url,
            "--name",
            node,
            "--site",
            site,
            "--data-dir",
            str(node_dir),
            "--ray-num-cpus",
            str(ray_cpus),
            "--ray-temp-dir",
            str(ray_tmp),
            # The stack stops as a whole (its server too): a stop marks the node draining
            # if the server still answers, and does not wait for work to move.
            "--drain-timeout",
            "0",
        ]
        info = self.sites.get(site)
        if info is None:
            port = free_port()
            info = SiteInfo(site, f"127.0.0.1:{port}", node_dir / "ray-token")
            self.sites[site] = info
            args += ["--head", "--ray-port", str(port)]
        else:
            args += ["--ray-address", info.head_address, "--ray-token-file", str(info.token_file)]
        if simulate:
            args += ["--simulate", simulate]
        self._spawn(f"agent-{node}", args, dict(self.env, ANDROMEDA_TOKEN=provider_token))
        if wait:
            self.wait_joined(node)

    def wait_joined(self, node: str, timeout_s: float = 120) -> None:
        admin = self.admin
        assert admin is not None
        self.wait(
            lambda: any(n.name == node and n.ray_joined for n in admin.nodes()),
            timeout_s,
            f"node {node}",
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
            time.sleep(0.25)
        raise click.ClickException(f"{what} not ready in {timeout_s:.0f}s; see {self.logs}/")

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.procs.append((name, proc))
        self._spawn_env[name] = env
        self.record.processes[name] = proc.pid
        self.record.save(self.data_dir)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process the stack started (tests: kill -9 a server or an agent)."""
        for n, proc in self.procs:
            if n == name and proc.poll() is None:
                os.kill(proc.pid, sig)
                proc.wait(30)

    def respawn(self, name: str) -> None:
        """Start a process again with the arguments it was first started with."""
        for i, (n, proc) in enumerate(self.procs):
            if n == name:
                assert proc.poll() is not None, f"{name} is still running"
                with open(self.logs / f"{name}.log", "ab") as out:
                    again = subprocess.Popen(
                        proc.args,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=self._spawn_env[name],
                        start_new_session=True,
                    )
                self.procs[i] = (name, again)
                self.record.processes[name] = again.pid
                self.record.save(self.data_dir)
                return
        raise KeyError(name)

    def close(self) -> None:
        """Stop agents (and so their Ray nodes), then the server; remove Ray's temp dirs."""
        if self.admin is not None:
            self.admin.close()
        stop_recorded(self.data_dir, procs=self.procs)


def stop_recorded(
    data_dir: Path, *, procs: list[tuple[str, subprocess.Popen[bytes]]] | None = None
) -> bool:
    """Stop what the stack recorded in ``data_dir`` (agents first, the server last), by its
    own record of process ids; False when there was no record."""
    record = StackRecord.load(data_dir)
    if record is None:
        return False
    children = {name: proc for name, proc in procs or []}
    order = sorted(record.processes.items(), key=lambda kv: kv[0] == "server")
    for _name, pid in order:
        if _ours(pid):
            signal_group(pid, signal.SIGTERM)
    for name, pid in order:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and group_alive(pid) and _ours(pid):
            if name in children:
                children[name].poll()  # reap our own child, or it stays a zombie
            time.sleep(0.1)
        if group_alive(pid) and _ours(pid):
            signal_group(pid, signal.SIGKILL)
        if name in children:
            children[name].poll()
    for pid_file in record.ray_pid_files:  # Ray nodes an agent killed with -9 left behind
        try:
            pid = int(Path(pid_file).read_text())
        except (OSError, ValueError):
            continue
        signal_group(pid, signal.SIGKILL)
    for tmp in record.temp_dirs:
        shutil.rmtree(tmp, ignore_errors=True)
    (data_dir / RECORD).unlink(missing_ok=True)
    return True


def _ours(pid: int) -> bool:
    """Whether ``pid`` still runs one of our programs (a recycled pid is someone else's)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"scheduler" in cmdline or b"ray" in cmdline
