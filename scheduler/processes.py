"""Stopping a child and everything it started.

Children that run other people's programs (an entrypoint, ``ray start``) are started in a
process group of their own; these helpers signal the whole group, also after its leader has
exited, so nothing they started outlives them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace_s: float) -> None:
    """SIGTERM the group led by ``proc``, SIGKILL whatever is left after ``grace_s``."""
    signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_alive(proc.pid):
        proc.poll()  # reap the leader, or it stays a zombie and the group looks alive
        time.sleep(0.1)
    signal_group(proc.pid, signal.SIGKILL)
    proc.poll()


def stop_via_leader(pid: int, grace_s: float, reap: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM only the group's leader (which shuts its children down itself, as
    ``ray start --block`` does), SIGKILL the whole group if anything is left after
    ``grace_s``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_alive(pid):
        if reap is not None:
            reap.poll()
        time.sleep(0.1)
    signal_group(pid, signal.SIGKILL)
    if reap is not None:
        reap.poll()
