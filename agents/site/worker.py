"""One rank of a gang: the actor class the site's launcher starts in every bundle.

Kept apart from ``launcher.py`` and light on imports (the standard library and two small
modules of ours): every worker actor imports it in a fresh Ray worker process, so what it
imports is paid at every gang's start.
"""

from __future__ import annotations

import ctypes
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

from scheduler.domain.labels import NODE_LABEL
from scheduler.processes import stop_group

# The host variables an entrypoint inherits; everything else (RAY_* above all) is dropped.
_PASS_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
_PASS_PREFIXES = ("CUDA_", "NCCL_", "NVIDIA_", "LD_LIBRARY_PATH")


class Worker:
    """One rank: runs the entrypoint on its node and keeps its output in a file there."""

    def __init__(self, allocation_id: int, rank: int, scratch_root: str) -> None:
        self.allocation_id = allocation_id
        self.rank = rank
        self.dir = Path(scratch_root) / f"alloc-{allocation_id}" / f"rank-{rank}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "output.log"
        # The entrypoint touches the marker after each checkpoint it saves (its mtime is
        # what the site reports); before a graceful stop's SIGTERM, the deadline file gets
        # "ANDROMEDA_PREEMPT_DEADLINE=<Unix seconds>" (shell-sourceable).
        self.marker_path = self.dir / "checkpoint-marker"
        self.deadline_path = self.dir / "preempt-deadline"
        for stale in (self.marker_path, self.deadline_path):
            stale.unlink(missing_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.exit_code: int | None = None
        self.exited_at: float | None = None
        self._exited = threading.Event()
        self._lock = threading.Lock()  # launch() and terminate() are served concurrently
        self._stopping = False

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _master_port()

    def node(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_labels().get(NODE_LABEL, "?"))

    def launch(
        self, command: str, env: dict[str, str], cwd: str | None, package: bytes | None
    ) -> float:
        """Start the entrypoint; returns its start time (Unix seconds on this node).

        ``package`` is the job's verified code zip (Ray brings it from the site's agent
        through its object store): it is unpacked into this rank's own folder, which
        becomes the working directory. Otherwise ``cwd`` must exist on this node."""
        node = self.node()
        if package is not None:
            code = self.dir / "code"
            shutil.rmtree(code, ignore_errors=True)
            with zipfile.ZipFile(io.BytesIO(package)) as zf:
                zf.extractall(code)
                for info in zf.infolist():  # keep the executable bits zip stores
                    mode = (info.external_attr >> 16) & 0o777
                    if mode:
                        os.chmod(code / info.filename, mode)
            cwd = str(code)
        elif cwd is not None and not os.path.isdir(cwd):
            raise FileNotFoundError(f"working_dir {cwd} does not exist on node {node}")
        full_env = {
            k: v for k, v in os.environ.items() if k in _PASS_ENV or k.startswith(_PASS_PREFIXES)
        }
        full_env.update(env)
        full_env["ANDROMEDA_NODE"] = node  # where this rank really landed: the pinning's proof
        full_env["ANDROMEDA_CHECKPOINT_MARKER"] = str(self.marker_path)
        full_env["ANDROMEDA_PREEMPT_DEADLINE_FILE"] = str(self.deadline_path)
        full_env["TMPDIR"] = str(self.dir)
        # "python" in an entrypoint means the interpreter this node runs Ray with.
        full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
        with self._lock:
            if self._stopping:  # terminate() came first: never start
                self._finish(-signal.SIGTERM)
                return time.time()
            with open(self.log_path, "ab") as out:
                # Its own process group, so terminate() reaches every process it starts.
                self.proc = subprocess.Popen(
                    ["bash", "-c", command],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=full_env,
                    cwd=cwd or os.getcwd(),
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            self.started_at = time.time()
        threading.Thread(target=self._reap, daemon=True).start()
        return self.started_at

    def _reap(self) -> None:
        assert self.proc is not None
        self._finish(self.proc.wait())

    def _finish(self, code: int) -> None:
        self.exited_at = time.time()
        self.exit_code = code
        self._exited.set()

    def wait(self) -> int:
        """Block until the entrypoint exits; its exit code (negative: killed by a signal)."""
        self._exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    def status(self) -> tuple[float | None, int | None, float | None]:
        """(start time, exit code, exit time), each None until it happened."""
        return self.started_at, self.exit_code, self.exited_at

    def tail(self, max_bytes: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self, grace_s: float, deadline_s: float | None = None) -> int | None:
        """SIGTERM the entrypoint's process group, SIGKILL what is left after ``grace_s``
        (also when its leader already exited, so background children die too). With a
        ``deadline_s`` (a graceful stop), the entrypoint's deadline file gets it first."""
        if deadline_s is not None:
            tmp = self.deadline_path.with_suffix(".tmp")
            tmp.write_text(f"ANDROMEDA_PREEMPT_DEADLINE={int(deadline_s)}\n")
            tmp.replace(self.deadline_path)
        with self._lock:
            self._stopping = True
            proc = self.proc
        if proc is not None:
            stop_group(proc, grace_s)
            self._exited.wait(5)
        return self.exit_code

    def checkpointed_at(self) -> float | None:
        """When the entrypoint last touched its checkpoint marker (Unix seconds), or None."""
        try:
            return self.marker_path.stat().st_mtime
        except FileNotFoundError:
            return None


def _master_port() -> int:
    """A free port for rank 0's rendezvous, outside the kernel's ephemeral range and Ray's
    worker ports (10002-19999): an ephemeral port can be taken as the source port of some
    outgoing connection before the entrypoint binds it."""
    for port in random.sample(range(*MASTER_PORT_RANGE), 64):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything tried was busy: let the kernel choose
        s.bind(("", 0))
        return int(s.getsockname()[1])


MASTER_PORT_RANGE = (20000, 32000)


def _die_with_parent() -> None:
    """In the child, before exec: be killed if the worker actor dies (OOM, node failure),
    so an entrypoint never keeps running, and holding its GPUs, for a gang already ended."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1
