"""The Ray backend on a real local Ray cluster: gangs pinned to nodes by label, the
distributed environment, failure, stop and logs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from scheduler.backends.base import AllocationState, Launch, Phase, WorkerLaunch
from scheduler.backends.ray_backend import RayBackend

pytestmark = pytest.mark.ray

_next = iter(range(10_000, 20_000))


def _launch(entrypoint: str, nodes: list[str], gpus: int = 1, **kw) -> Launch:  # type: ignore[no-untyped-def]
    workers = tuple(
        WorkerLaunch(
            rank=r,
            node_name=n,
            gpu_uuids=tuple(f"GPU-{n}-{i}" for i in range(gpus)),
            local_rank=nodes[:r].count(n),
        )
        for r, n in enumerate(nodes)
    )
    return Launch(
        allocation_id=next(_next),
        job_id=1,
        job_name="t",
        entrypoint=entrypoint,
        workers=workers,
        **kw,
    )


def _wait(
    backend: RayBackend, alloc: int, until: set[Phase], timeout: float = 90
) -> AllocationState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = backend.poll(alloc)
        if state.phase in until:
            return state
        time.sleep(0.2)
    raise AssertionError(f"allocation {alloc} still {backend.poll(alloc)} after {timeout}s")


ENV_DUMP = (
    'echo "rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK node=$ANDROMEDA_NODE '
    'master=$MASTER_ADDR:$MASTER_PORT gpus=$CUDA_VISIBLE_DEVICES"'
)


def test_each_rank_runs_on_the_node_its_bundle_was_pinned_to(ray_backend: RayBackend) -> None:
    launch = _launch(ENV_DUMP, ["ray-b", "ray-a", "ray-b"], gpus=1)
    ray_backend.start(launch)
    assert (
        _wait(ray_backend, launch.allocation_id, {Phase.succeeded, Phase.failed}).phase
        is Phase.succeeded
    )
    logs = ray_backend.logs(launch.allocation_id)
    ray_backend.stop(launch.allocation_id)
    assert "rank=0 world=3 local=0 node=ray-b" in logs[0]
    assert "rank=1 world=3 local=0 node=ray-a" in logs[1]
    assert "rank=2 world=3 local=1 node=ray-b" in logs[2]
    masters = {line.split("master=")[1].split()[0] for line in logs.values()}
    assert len(masters) == 1 and not masters.pop().endswith(":")
    assert "gpus=GPU-ray-a-0" in logs[1]


def test_a_failing_rank_fails_the_allocation_with_its_exit_code(ray_backend: RayBackend) -> None:
    launch = _launch(
        'if [ "$RANK" = 1 ]; then echo boom >&2; exit 3; fi; sleep 60', ["ray-a", "ray-b"]
    )
    ray_backend.start(launch)
    state = _wait(ray_backend, launch.allocation_id, {Phase.succeeded, Phase.failed})
    assert state.phase is Phase.failed and state.error == "rank 1 exited with code 3"
    assert "boom" in ray_backend.logs(launch.allocation_id)[1]
    ray_backend.stop(launch.allocation_id)


def test_stop_kills_the_workers_and_frees_the_gpus(ray_backend: RayBackend, tmp_path: Path) -> None:
    import ray

    total = ray.cluster_resources()["GPU"]
    pidfile = tmp_path / "pid"
    # the entrypoint starts a background child too: stop must reach the whole group
    launch = _launch(f"sleep 300 & echo $! > {pidfile}; wait", ["ray-c"], gpus=4)
    ray_backend.start(launch)
    _wait(ray_backend, launch.allocation_id, {Phase.running})
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    assert ray.available_resources().get("GPU", 0) <= total - 4
    ray_backend.stop(launch.allocation_id)
    assert ray_backend.poll(launch.allocation_id).phase is Phase.unknown
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not _alive(pid) and ray.available_resources().get("GPU", 0) == total:
            break
        time.sleep(0.2)
    assert not _alive(pid), "the entrypoint's child survived stop()"
    assert ray.available_resources().get("GPU", 0) == total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_gang_for_a_node_ray_does_not_have_is_reported_lost_with_a_reason(
    ray_cluster: str,
) -> None:
    backend = RayBackend(ray_cluster, reserve_timeout_s=2)
    launch = _launch("true", ["no-such-node"])
    backend.start(launch)
    state = _wait(
        backend, launch.allocation_id, {Phase.lost, Phase.failed, Phase.succeeded}, timeout=30
    )
    assert state.phase is Phase.lost and "not placed within" in (state.error or "")
    backend.stop(launch.allocation_id)


def test_a_child_left_behind_by_a_finished_entrypoint_is_stopped_with_the_allocation(
    ray_backend: RayBackend, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    launch = _launch(f"nohup sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}; exit 0", ["ray-a"])
    ray_backend.start(launch)
    assert (
        _wait(ray_backend, launch.allocation_id, {Phase.succeeded, Phase.failed}).phase
        is Phase.succeeded
    )
    pid = int(pidfile.read_text())
    assert _alive(pid)
    ray_backend.stop(launch.allocation_id)
    assert not _alive(pid), "a stray child outlived its allocation"
