"""Starts and supervises this host's Ray worker node, labelled for the control plane.

The agent runs ``ray start --block`` as a child in its own process group, with the labels
the server returned at registration, and this host's GPU count as Ray's ``GPU`` resource.
Nothing here imports ``ray``: the worker is a separate process, as it would be on a real
provider host.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from scheduler.processes import stop_group

log = logging.getLogger(__name__)

STARTED_MARKER = "Ray runtime started"


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


class RayNode:
    """One ``ray start --block`` process: a worker joining ``address``, or a head when
    ``address`` is None (the demo and the tests start their local head this way)."""

    def __init__(
        self,
        *,
        address: str | None,
        labels: dict[str, str] | None = None,
        num_gpus: int = 0,
        num_cpus: int | None = None,
        head_port: int = 6380,
        object_store_bytes: int = 100 * 1024 * 1024,
        log_path: Path | None = None,
    ) -> None:
        self.address = address
        self.labels = labels or {}
        self.num_gpus = num_gpus
        self.num_cpus = num_cpus
        self.head_port = head_port
        self.object_store_bytes = object_store_bytes
        self.log_path = log_path
        self._proc: subprocess.Popen[str] | None = None
        self._started = threading.Event()

    @property
    def gcs_address(self) -> str:
        return self.address or f"127.0.0.1:{self.head_port}"

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
        return cmd

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the worker and wait until Ray says it joined the cluster."""
        self._started.clear()
        cmd = self.command()
        log.info("starting Ray worker: %s", " ".join(cmd))
        # (Ray's raylet-subreaper option would also reap orphans, but it makes workers
        # ignore SIGCHLD, and then every entrypoint's exit code reads as 0.)
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=env,
        )
        threading.Thread(target=self._pump, args=(self._proc,), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not self._started.wait(0.2):
            if self._proc.poll() is not None:
                raise RayNodeError(
                    f"ray start exited with code {self._proc.returncode}"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RayNodeError(f"Ray did not start at {self.gcs_address} in {timeout_s:.0f}s")
        log.info("Ray node up at %s with labels %s", self.gcs_address, self.labels)

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        out = open(self.log_path, "a") if self.log_path else None  # noqa: SIM115
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if out:
                    out.write(line)
                    out.flush()
                if STARTED_MARKER in line:
                    self._started.set()
        finally:
            if out:
                out.close()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._started.is_set()

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop ``ray start`` and every process of its group (raylet, workers), even when
        ``ray start`` itself has already exited and left them behind."""
        proc = self._proc
        if proc is None:
            return
        stop_group(proc, grace_s)
        log.info("Ray node stopped")
