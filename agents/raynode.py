"""Starts and supervises this host's Ray node: a site's head, or a worker joining it.

The agent runs ``ray start --block`` as a child in its own process group, with the labels
the control plane returned at registration, this host's GPU count as Ray's ``GPU``
resource, and Ray's token authentication on (``RAY_AUTH_MODE=token``, the site's token in
a file only the agent's user can read). The node is a separate process, as it is on a
real provider host, and whether it has joined the cluster is read from Ray itself by the
site's agent (``ray.nodes()``), not from its output.

The process id is kept in ``pid_file``: an agent that restarts (after a crash, an upgrade)
adopts the Ray node still running instead of starting a second one, so the work on it
goes on undisturbed.

Whether the node is up is asked of Ray too, not only of the process table (``GcsProbe``):
the site's GCS keeps the table of nodes that Ray's own scheduler places work by, and says
which are alive (it health-checks every raylet). A ``ray start --block`` still running
whose node the GCS has declared dead (a raylet that hung or was cut off and fenced) serves
nothing, and is restarted. Of the ways Ray offers to ask, this is the cheapest robust one:
one small RPC to the GCS (``check_alive`` for the node id, found once by the node's
``andromeda.io/node`` label) from a thread of the agent, where ``ray health-check`` would
start a Python process importing Ray every time and only say that the GCS answers, and the
raylet's HTTP health endpoint needs Ray's dashboard packages, which the agent does not
install. The probe imports ``ray._raylet`` (the GCS client Ray's own CLI uses) lazily in
that thread; if that import fails (a Ray without it), the agent falls back to the process
table and says so once. A GCS that does not answer says nothing either way: a worker's
head may be restarting, and restarting this node would not help.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from scheduler.domain.labels import NODE_LABEL
from scheduler.processes import stop_via_leader

log = logging.getLogger(__name__)


class RayNodeError(Exception):
    pass


def ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise RayNodeError("the `ray` command is not installed on this host")
    return found


def ensure_token(path: Path) -> Path:
    """The site's Ray token file, created (random, mode 0600) if it does not exist yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def token_env(token_file: Path) -> dict[str, str]:
    """The environment that makes a Ray process (node or driver) use the site's token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


class GcsProbe:
    """Asks the site's GCS whether the Ray node labelled ``andromeda.io/node=node_name``
    is alive (module docstring). ``check()``: True alive, False the GCS has no live node of
    that name, None no answer (the GCS is unreachable, or Ray's client is unavailable)."""

    _ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE

    def __init__(self, gcs_address: str, node_name: str, *, timeout_s: float = 5.0) -> None:
        self.gcs_address = gcs_address
        self.node_name = node_name
        self.timeout_s = timeout_s
        self.unavailable: str | None = None  # why Ray's client cannot be used here
        self._client: Any = None
        self._node_id: Any = None

    def check(self) -> bool | None:
        if self.unavailable is not None:
            return None
        try:
            if self._client is None:
                # Imported here, in the probe's thread: nothing else in the agent needs Ray.
                from ray._raylet import GcsClient  # type: ignore[attr-defined]

                self._client = GcsClient(address=self.gcs_address)
            if self._node_id is not None:
                (alive,) = self._client.check_alive([self._node_id], timeout=self.timeout_s)
                if alive:
                    return True
                self._node_id = None  # dead; a restarted node has a new id
                return False
            self._node_id = self._find()
            return self._node_id is not None
        except (ImportError, AttributeError, TypeError) as exc:
            self.unavailable = f"Ray's GCS client is not usable here ({exc})"
            log.warning("%s: the Ray node is watched through its process only", self.unavailable)
            return None
        except Exception as exc:  # the GCS did not answer (ray.exceptions.RpcError)
            log.debug("the GCS at %s did not answer: %s", self.gcs_address, exc)
            self._client = None  # reconnect next time: the head may have restarted
            return None

    def _find(self) -> Any:
        """The id of the newest live node with our label, or None."""
        nodes = self._client.get_all_node_info(timeout=self.timeout_s)
        ours = [
            (info.start_time_ms, node_id)
            for node_id, info in nodes.items()
            if info.state == self._ALIVE and info.labels.get(NODE_LABEL) == self.node_name
        ]
        return max(ours, key=lambda o: o[0])[1] if ours else None


class RayNode:
    """One ``ray start --block`` process: a worker joining ``address``, or a head when
    ``address`` is None.

    With ``probe_interval_s`` set and a node label among ``labels``, a thread asks the GCS
    about the node every ``probe_interval_s`` after a first ``startup_grace_s``; after
    ``dead_after`` answers in a row that it is not alive, ``alive()`` is False."""

    def __init__(
        self,
        *,
        address: str | None,
        token_file: Path | None,
        labels: dict[str, str] | None = None,
        num_gpus: int = 0,
        num_cpus: int | None = None,
        head_port: int = 6380,
        object_store_bytes: int = 100 * 1024 * 1024,
        temp_dir: Path | None = None,
        log_path: Path | None = None,
        pid_file: Path | None = None,
        probe_interval_s: float | None = None,
        startup_grace_s: float = 30.0,
        dead_after: int = 3,
    ) -> None:
        self.address = address
        self.token_file = token_file
        self.labels = labels or {}
        self.num_gpus = num_gpus
        self.num_cpus = num_cpus
        self.head_port = head_port
        self.object_store_bytes = object_store_bytes
        self.temp_dir = temp_dir
        self.log_path = log_path
        self.pid_file = pid_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._adopted_pid: int | None = None
        self.probe_interval_s = probe_interval_s
        self.startup_grace_s = startup_grace_s
        self.dead_after = dead_after
        name = self.labels.get(NODE_LABEL)
        self.probe = GcsProbe(self.gcs_address, name) if name and probe_interval_s else None
        self._gcs_misses = 0
        self._watching: threading.Event | None = None

    @property
    def gcs_address(self) -> str:
        return self.address or f"127.0.0.1:{self.head_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else self._adopted_pid

    def command(self) -> list[str]:
        cmd = [
            ray_executable(),
            "start",
            "--block",
            f"--num-gpus={self.num_gpus}",
            f"--object-store-memory={self.object_store_bytes}",
            "--disable-usage-stats",
        ]
        if self.address is None:
            cmd += ["--head", f"--port={self.head_port}", "--include-dashboard=false"]
        else:
            cmd.append(f"--address={self.address}")
        if self.labels:
            cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(self.labels.items())))
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.temp_dir is not None:
            cmd.append(f"--temp-dir={self.temp_dir}")
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        if self.token_file is not None:
            env.update(token_env(self.token_file))
        return env

    def adopt(self) -> bool:
        """Take over the Ray node a previous agent started, if it is still running."""
        if self.pid_file is None or not self.pid_file.is_file():
            return False
        try:
            pid = int(self.pid_file.read_text().strip())
        except ValueError:
            return False
        if not _is_ray_start(pid):
            return False
        self._adopted_pid = pid
        log.info("adopted the Ray node already running (pid %d)", pid)
        self._watch(grace_s=0.0)
        return True

    def start(self, settle_s: float = 1.0) -> None:
        """Start the node; fails if ``ray start`` exits at once (a bad address, no token).
        Whether it joined is for Ray to say (the site's agent asks it), not its output."""
        cmd = self.command()
        log.info("starting Ray %s: %s", "head" if self.address is None else "node", " ".join(cmd))
        # (Ray's raylet-subreaper option would also reap orphans, but it makes workers
        # ignore SIGCHLD, and then every entrypoint's exit code reads as 0.)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env(),
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        self._adopted_pid = None
        if self.pid_file is not None:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(str(self._proc.pid))
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RayNodeError(
                    f"ray start exited with code {self._proc.returncode}"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            time.sleep(0.1)
        self._watch(grace_s=self.startup_grace_s)

    def restart(self) -> None:
        self.stop()
        self.start()

    def process_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._adopted_pid is not None and _is_ray_start(self._adopted_pid)

    def alive(self) -> bool:
        """The process runs, and the GCS has not said ``dead_after`` times in a row that
        the node is not alive."""
        return self.process_alive() and self._gcs_misses < self.dead_after

    def down_reason(self) -> str:
        if not self.process_alive():
            return "its process has exited"
        return (
            f"the site's GCS has not seen it alive in {self._gcs_misses} checks "
            f"{self.probe_interval_s:.0f} s apart"
        )

    def _watch(self, *, grace_s: float) -> None:
        """(Re)start the GCS probe thread for the node just started or adopted."""
        self._unwatch()
        self._gcs_misses = 0
        if self.probe is None or self.probe_interval_s is None:
            return
        stop = self._watching = threading.Event()
        probe, interval = self.probe, self.probe_interval_s

        def _loop() -> None:
            if stop.wait(grace_s):
                return
            while not stop.is_set():
                verdict = probe.check()
                if stop.is_set():
                    return
                if verdict is True:
                    self._gcs_misses = 0
                elif verdict is False:
                    self._gcs_misses += 1
                    log.warning("the site's GCS does not list this host's Ray node as alive")
                if stop.wait(interval):
                    return

        threading.Thread(target=_loop, name="ray-gcs-probe", daemon=True).start()

    def _unwatch(self) -> None:
        if self._watching is not None:
            self._watching.set()
            self._watching = None

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop ``ray start`` (it drains and stops the node's Ray processes itself), then
        kill whatever of its group is left, also when ``ray start`` had already exited."""
        self._unwatch()
        pid = self.pid
        if pid is None:
            return
        stop_via_leader(pid, grace_s, reap=self._proc)
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
        log.info("Ray node stopped")


def _is_ray_start(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"ray") for part in cmdline[:3]) and b"start" in cmdline
