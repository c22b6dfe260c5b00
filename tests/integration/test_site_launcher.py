"""The site launcher on a real local Ray cluster with token authentication: gangs pinned to
nodes by label, the distributed environment and nothing of Ray's in it, failure, stop,
packages, and finding running work again after the agent restarts."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agents.site.launcher import LaunchEvent, SiteLauncher
from scheduler.packaging import pack
from scheduler.schemas import Assignment, WorkerAssignment

pytestmark = pytest.mark.ray

_ids = itertools.count(10_000)


def _assignment(entrypoint: str, nodes: list[str], gpus: int = 1, **kw) -> Assignment:  # type: ignore[no-untyped-def]
    return Assignment(
        allocation_id=next(_ids),
        job_id=7,
        job_name="t",
        action="run",
        entrypoint=entrypoint,
        env=kw.pop("env", {}),
        workers=[
            WorkerAssignment(
                rank=r,
                node=n,
                gpu_uuids=[f"GPU-{n}-{i}" for i in range(gpus)],
                local_rank=nodes[:r].count(n),
            )
            for r, n in enumerate(nodes)
        ],
        package_sha256=None,
        working_dir=kw.pop("working_dir", None),
        checkpoint_uri=None,
    )


_seen: list[LaunchEvent] = []  # events polled but not yet asked for


def _until(launcher: SiteLauncher, alloc: int, kinds: set[str], timeout: float = 90) -> LaunchEvent:
    """The next event of ``alloc`` of one of ``kinds`` (one poll may return several)."""
    deadline = time.monotonic() + timeout
    while True:
        for event in _seen:
            if event.allocation_id == alloc and event.kind in kinds:
                _seen.remove(event)
                return event
        if time.monotonic() > deadline:
            raise AssertionError(f"allocation {alloc}: no {kinds} in {timeout}s (saw {_seen})")
        _seen.extend(launcher.poll())
        time.sleep(0.1)


ENV_DUMP = (
    'echo "rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK node=$ANDROMEDA_NODE '
    'master=$MASTER_ADDR:$MASTER_PORT gpus=$CUDA_VISIBLE_DEVICES ray_vars=$(env | grep -c ^RAY_)"'
)


def test_each_rank_runs_on_the_node_its_bundle_was_pinned_to_without_any_ray_variable(
    launcher: SiteLauncher,
) -> None:
    a = _assignment(ENV_DUMP, ["ray-b", "ray-a", "ray-b"])
    launcher.start(a, package=None)
    started = _until(launcher, a.allocation_id, {"started"})
    done = _until(launcher, a.allocation_id, {"finished", "lost"})
    launcher.teardown(a.allocation_id)
    assert started.at <= done.at
    assert done.kind == "finished" and done.exit_codes == {0: 0, 1: 0, 2: 0}
    logs = done.logs
    assert "rank=0 world=3 local=0 node=ray-b" in logs[0]
    assert "rank=1 world=3 local=0 node=ray-a" in logs[1]
    assert "rank=2 world=3 local=1 node=ray-b" in logs[2]
    masters = {line.split("master=")[1].split()[0] for line in logs.values()}
    assert len(masters) == 1 and not masters.pop().endswith(":")
    assert "gpus=GPU-ray-a-0" in logs[1]
    assert all("ray_vars=0" in text for text in logs.values()), logs


def test_a_failing_rank_fails_the_gang_names_the_rank_and_stops_the_others(
    launcher: SiteLauncher,
) -> None:
    a = _assignment(
        'if [ "$RANK" = 1 ]; then echo boom >&2; exit 3; fi; sleep 60', ["ray-a", "ray-b"]
    )
    launcher.start(a, package=None)
    done = _until(launcher, a.allocation_id, {"finished", "lost"})
    launcher.teardown(a.allocation_id)
    assert done.kind == "finished" and done.failed_rank == 1
    assert done.error == "rank 1 exited with code 3"
    assert done.exit_codes[1] == 3 and done.exit_codes[0] != 0  # rank 0 was stopped
    assert "boom" in done.logs[1]


def test_stop_kills_the_workers_and_their_children_and_frees_the_gpus(
    launcher: SiteLauncher, tmp_path: Path
) -> None:
    import ray

    total = ray.cluster_resources()["GPU"]
    pidfile = tmp_path / "pid"
    # the entrypoint starts a background child too: stop must reach the whole group
    a = _assignment(f"sleep 300 & echo $! > {pidfile}; wait", ["ray-c"], gpus=4)
    launcher.start(a, package=None)
    _until(launcher, a.allocation_id, {"started"})
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    assert ray.available_resources().get("GPU", 0) <= total - 4
    assert launcher.stop(a.allocation_id, grace_s=2) is None  # returns at once
    assert a.allocation_id in launcher.active()  # its GPUs are held while it stops
    stopped = _until(launcher, a.allocation_id, {"stopped"})
    assert stopped.kind == "stopped"
    assert a.allocation_id not in launcher.active()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not _alive(pid) and ray.available_resources().get("GPU", 0) == total:
            break
        time.sleep(0.2)
    assert not _alive(pid), "the entrypoint's child survived stop()"
    assert ray.available_resources().get("GPU", 0) == total


GRACEFUL = textwrap.dedent(
    """
    trap 'source "$ANDROMEDA_PREEMPT_DEADLINE_FILE"; echo "deadline=$ANDROMEDA_PREEMPT_DEADLINE";
          echo saved > "$ANDROMEDA_CHECKPOINT_MARKER"; echo "checkpointed at SIGTERM"; exit 0' TERM
    touch "$ANDROMEDA_CHECKPOINT_MARKER"
    echo running
    while true; do sleep 0.2; done
    """
)


def test_a_graceful_stop_gives_the_deadline_before_sigterm_and_reports_checkpoints(
    launcher: SiteLauncher,
) -> None:
    a = _assignment(GRACEFUL, ["ray-a", "ray-b"])
    launcher.start(a, package=None)
    _until(launcher, a.allocation_id, {"started"})
    checkpoints: dict[int, object] = {}
    deadline = time.monotonic() + 30
    while a.allocation_id not in checkpoints and time.monotonic() < deadline:
        checkpoints.update(launcher.checkpoints())
        time.sleep(0.2)
    assert a.allocation_id in checkpoints, "rank 0's checkpoint marker was not reported"
    before = time.time()
    assert launcher.stop(a.allocation_id, grace_s=20) is None
    stopped = _until(launcher, a.allocation_id, {"stopped"}, timeout=60)
    # the workers exited on their own well within the grace: nobody waited it out
    assert time.time() - before < 15
    for rank in (0, 1):
        out = stopped.logs[rank]
        assert "checkpointed at SIGTERM" in out, out
        told = int(out.split("deadline=")[1].split()[0])
        assert before + 19 <= told <= time.time() + 21


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_gang_for_a_node_not_in_the_site_is_reported_lost_with_a_reason(
    launcher: SiteLauncher,
) -> None:
    a = _assignment("true", ["no-such-node"])
    launcher.start(a, package=None)
    done = _until(launcher, a.allocation_id, {"lost", "finished"}, timeout=30)
    launcher.teardown(a.allocation_id)
    assert done.kind == "lost"
    assert done.error == "node no-such-node is not alive in site orion's Ray cluster"


def test_a_missing_working_dir_says_which_folder_and_which_node(launcher: SiteLauncher) -> None:
    a = _assignment("true", ["ray-a"], working_dir="/nonexistent/code")
    launcher.start(a, package=None)
    done = _until(launcher, a.allocation_id, {"lost", "finished"})
    launcher.teardown(a.allocation_id)
    assert done.kind == "finished"
    assert done.error == "working_dir /nonexistent/code does not exist on node ray-a"


def test_a_package_is_unpacked_as_each_ranks_working_directory(
    launcher: SiteLauncher, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "hello.py").write_text("import os; print('hello from', os.environ['RANK'])\n")
    (code / ".gitignore").write_text("secret.txt\n")
    (code / "secret.txt").write_text("not shipped")
    package = pack(code)
    zip_path = tmp_path / f"{package.sha256}.zip"
    zip_path.write_bytes(package.data)
    a = _assignment("python hello.py && test ! -e secret.txt", ["ray-a", "ray-b"])
    launcher.start(a, package=zip_path)
    done = _until(launcher, a.allocation_id, {"finished", "lost"})
    launcher.teardown(a.allocation_id)
    assert done.exit_codes == {0: 0, 1: 0}, done
    assert "hello from 0" in done.logs[0] and "hello from 1" in done.logs[1]


def test_a_child_left_behind_by_a_finished_entrypoint_is_stopped_at_teardown(
    launcher: SiteLauncher, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    a = _assignment(f"nohup sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}; exit 0", ["ray-a"])
    launcher.start(a, package=None)
    done = _until(launcher, a.allocation_id, {"finished", "lost"})
    assert done.exit_codes == {0: 0}
    pid = int(pidfile.read_text())
    assert _alive(pid)
    launcher.teardown(a.allocation_id)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "a stray child outlived its allocation"


def test_a_restarted_agent_finds_running_and_finished_work_again(
    launcher: SiteLauncher, tmp_path: Path
) -> None:
    """The workers are detached: they outlive the agent's Ray driver, and the next one
    learns from the workers themselves what became of them."""
    gate = tmp_path / "go"
    running = _assignment(f"while [ ! -e {gate} ]; do sleep 0.1; done; echo finished", ["ray-a"])
    finished = _assignment("echo quick", ["ray-b"])
    launcher.start(running, package=None)
    launcher.start(finished, package=None)
    _until(launcher, running.allocation_id, {"started"})
    _until(launcher, finished.allocation_id, {"finished"})
    launcher.close()  # the agent dies; its detached workers do not
    gate.touch()  # the running job finishes while no agent is there
    time.sleep(1)
    launcher.connect()
    found = launcher.discover()
    assert {running.allocation_id, finished.allocation_id} <= found
    results = {}
    deadline = time.monotonic() + 30
    while len(results) < 2 and time.monotonic() < deadline:
        for event in launcher.poll():
            results[event.allocation_id] = event
        time.sleep(0.1)
    assert results[running.allocation_id].kind == "finished"
    assert results[running.allocation_id].exit_codes == {0: 0}
    assert "finished" in results[running.allocation_id].logs[0]
    assert results[finished.allocation_id].exit_codes == {0: 0}
    for alloc in (running.allocation_id, finished.allocation_id):
        launcher.teardown(alloc)


def test_a_process_without_the_sites_token_cannot_join_its_ray_cluster(
    ray_site: dict[str, object],
) -> None:
    probe = textwrap.dedent(
        f"""
        import os
        os.environ["RAY_NUM_REDIS_GET_RETRIES"] = "2"
        import ray
        try:
            ray.init(address="{ray_site["address"]}", log_to_driver=False)
        except ConnectionError as exc:
            print("refused:", exc)
        else:
            print("CONNECTED")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(ray_site["scratch"])  # no ~/.ray/auth_token to fall back on
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert "refused:" in out.stdout, out.stdout + out.stderr
    assert "Unauthenticated" in out.stderr or "InvalidAuthToken" in out.stderr
