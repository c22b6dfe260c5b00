"""Runs allocations on a Ray cluster: one placement group per allocation, one bundle per
worker, each bundle pinned to its chosen node by the node label the agent set.

Life of an allocation here (advanced by ``poll``, never blocking the scheduler loop):

    reserving  placement group created, waiting until every bundle is placed
    launching  one worker actor per bundle; rank 0 reports its address and a free port
    running    every worker runs the entrypoint as a subprocess with RANK, WORLD_SIZE,
               LOCAL_RANK, MASTER_ADDR, MASTER_PORT and CUDA_VISIBLE_DEVICES set
    done       all exited 0 (succeeded), one exited non-zero (failed), or a worker's actor
               died, with its node or its process (lost); the scheduler loop then stops
               the remaining workers at once, so a gang never runs partly

This is the only module that imports ``ray``; it does so lazily in ``RayBackend.__init__``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.backends.base import AllocationState, BackendError, Launch, Phase
from scheduler.domain.labels import NODE_LABEL
from scheduler.processes import stop_group

log = logging.getLogger(__name__)

NAMESPACE = "andromeda"
STOP_GRACE_S = 10.0


class _WorkerImpl:
    """Runs one rank's entrypoint on its node and keeps its output in a local file."""

    def __init__(self, allocation_id: int, rank: int) -> None:
        log_dir = Path(tempfile.gettempdir()) / "andromeda-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"alloc-{allocation_id}-rank-{rank}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # run() and terminate() are served concurrently
        self._stopping = False

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _master_port()

    def run(self, command: str, env: dict[str, str], cwd: str | None) -> int:
        import ray

        full_env = dict(os.environ)
        full_env.update(env)
        # The node this rank really landed on, as Ray knows it: evidence of the pinning.
        labels = ray.get_runtime_context().get_node_labels()
        full_env["ANDROMEDA_NODE"] = str(labels.get(NODE_LABEL, ""))
        # "python" in an entrypoint means the interpreter this node runs Ray with.
        full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
        with self._lock:
            if self._stopping:  # terminate() came first: never start
                return -signal.SIGTERM
            with open(self.log_path, "wb") as out:
                # Its own process group, so terminate() reaches every process it starts.
                self.proc = subprocess.Popen(
                    ["bash", "-c", command],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=full_env,
                    cwd=cwd or None,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
        return self.proc.wait()

    def tail(self, max_bytes: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self, grace_s: float) -> None:
        """SIGTERM the entrypoint's whole process group, SIGKILL what is left after
        ``grace_s``. Signals the group even when its leader has already exited, so that
        background children do not outlive the allocation."""
        with self._lock:
            self._stopping = True
            proc = self.proc
        if proc is not None:
            stop_group(proc, grace_s)


@dataclass
class _Handle:
    launch: Launch
    pg: Any
    phase: str = "reserving"
    ready_ref: Any = None
    actors: list[Any] = field(default_factory=list)
    address_ref: Any = None
    run_refs: dict[Any, int] = field(default_factory=dict)
    exit_codes: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    started: float = field(default_factory=time.monotonic)


class RayBackend:
    """``ExecutionBackend`` over Ray placement groups (see the module docstring)."""

    def __init__(
        self, address: str, *, log_tail_bytes: int = 64_000, reserve_timeout_s: float = 300.0
    ) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray is a hard dependency
            raise BackendError("ray is not installed") from exc
        self._ray = ray
        if not ray.is_initialized():
            try:
                ray.init(
                    address=address,
                    namespace=NAMESPACE,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                )
            except Exception as exc:
                raise BackendError(f"cannot connect to Ray at {address}: {exc}") from exc
        # threaded actor: tail() and terminate() are served while run() blocks
        self._worker_cls = ray.remote(num_cpus=1, max_concurrency=4)(_WorkerImpl)  # type: ignore[call-overload]
        self._handles: dict[int, _Handle] = {}
        self._lock = threading.RLock()
        self._tail = log_tail_bytes
        self._reserve_timeout_s = reserve_timeout_s

    # --- ExecutionBackend -----------------------------------------------------------------
    def start(self, launch: Launch) -> None:
        from ray.util.placement_group import placement_group

        bundles = [{"CPU": 1.0, "GPU": float(len(w.gpu_uuids))} for w in launch.workers]
        selectors = [{NODE_LABEL: w.node_name} for w in launch.workers]
        from ray.util.placement_group import remove_placement_group

        pg = None
        try:
            pg = placement_group(
                bundles,
                strategy="PACK",
                name=f"andromeda-alloc-{launch.allocation_id}",
                bundle_label_selector=selectors,
            )
            ready_ref = pg.ready()
        except Exception as exc:
            if pg is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(pg)
            raise BackendError(f"placement group rejected: {exc}") from exc
        with self._lock:
            self._handles[launch.allocation_id] = _Handle(launch=launch, pg=pg, ready_ref=ready_ref)
        log.info(
            "allocation %s: placement group for %s on %s",
            launch.allocation_id,
            launch.job_name,
            [w.node_name for w in launch.workers],
        )

    def poll(self, allocation_id: int) -> AllocationState:
        with self._lock:
            handle = self._handles.get(allocation_id)
            if handle is None:
                return AllocationState(Phase.unknown)
            try:
                self._advance(handle)
            except (self._ray.exceptions.RayActorError, _NotPlaced) as exc:
                # a worker died with its node or process, or the nodes never had room:
                # not the job's fault, so the loop requeues it (counted as an attempt)
                handle.phase = "lost"
                handle.error = handle.error or _describe(exc)
            except Exception as exc:  # the entrypoint could not run (bad working_dir, ...)
                handle.phase = "failed"
                handle.error = handle.error or _describe(exc)
            if handle.phase in ("succeeded", "failed", "lost"):
                return AllocationState(Phase(handle.phase), handle.error)
            return AllocationState(Phase.running if handle.phase == "running" else Phase.starting)

    def stop(self, allocation_id: int) -> dict[int, str]:
        with self._lock:
            handle = self._handles.pop(allocation_id, None)
        if handle is None:
            return {}
        logs = self._collect_logs(handle)  # the loop keeps them in the database
        self._teardown(handle)
        return logs

    def logs(self, allocation_id: int) -> dict[int, str]:
        with self._lock:
            handle = self._handles.get(allocation_id)
            if handle is None:
                return {}
        return self._collect_logs(handle)

    def active(self) -> set[int]:
        with self._lock:
            return set(self._handles)

    def close(self) -> None:
        for allocation_id in list(self.active()):
            self.stop(allocation_id)

    # --- internals ---------------------------------------------------------------------------
    def _advance(self, h: _Handle) -> None:
        ray = self._ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if h.phase == "reserving":
            ready, _ = ray.wait([h.ready_ref], timeout=0)
            if not ready:
                if time.monotonic() - h.started > self._reserve_timeout_s:
                    raise _NotPlaced(
                        f"placement group not placed within {self._reserve_timeout_s:.0f}s "
                        "(are the nodes' Ray workers up with their labels?)"
                    )
                return
            for i, w in enumerate(h.launch.workers):
                actor = self._worker_cls.options(
                    num_gpus=len(w.gpu_uuids),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=h.pg, placement_group_bundle_index=i
                    ),
                ).remote(h.launch.allocation_id, w.rank)
                h.actors.append(actor)
            h.address_ref = h.actors[0].address.remote()
            h.phase = "launching"
        if h.phase == "launching":
            ready, _ = ray.wait([h.address_ref], timeout=0)
            if not ready:
                return
            master_addr, master_port = ray.get(h.address_ref)
            world = len(h.launch.workers)
            for actor, w in zip(h.actors, h.launch.workers, strict=True):
                env = dict(h.launch.env)
                env.update(
                    RANK=str(w.rank),
                    WORLD_SIZE=str(world),
                    LOCAL_RANK=str(w.local_rank),
                    MASTER_ADDR=str(master_addr),
                    MASTER_PORT=str(master_port),
                    CUDA_VISIBLE_DEVICES=",".join(w.gpu_uuids),
                    ANDROMEDA_JOB_ID=str(h.launch.job_id),
                    ANDROMEDA_JOB_NAME=h.launch.job_name,
                    ANDROMEDA_ALLOCATION_ID=str(h.launch.allocation_id),
                    RAY_ADDRESS=_gcs_address(ray),
                )
                if h.launch.checkpoint_uri:
                    env["ANDROMEDA_CHECKPOINT"] = h.launch.checkpoint_uri
                ref = actor.run.remote(h.launch.entrypoint, env, h.launch.working_dir)
                h.run_refs[ref] = w.rank
            h.phase = "running"
        if h.phase == "running":
            pending = [r for r in h.run_refs if h.run_refs[r] not in h.exit_codes]
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in done:
                h.exit_codes[h.run_refs[ref]] = ray.get(ref)
            failed = {r: c for r, c in h.exit_codes.items() if c != 0}
            if failed:
                rank, code = min(failed.items())
                h.error = f"rank {rank} exited with code {code}"
                h.phase = "failed"
            elif len(h.exit_codes) == len(h.launch.workers):
                h.phase = "succeeded"

    def _collect_logs(self, h: _Handle) -> dict[int, str]:
        ranks = [w.rank for w in h.launch.workers][: len(h.actors)]
        refs = {a.tail.remote(self._tail): rank for a, rank in zip(h.actors, ranks, strict=True)}
        out: dict[int, str] = {}
        for ref, rank in refs.items():
            try:
                out[rank] = self._ray.get(ref, timeout=10)
            except Exception as exc:
                out[rank] = f"<logs unavailable: {_describe(exc)}>"
        return out

    def _teardown(self, h: _Handle) -> None:
        from ray.util.placement_group import remove_placement_group

        refs = [a.terminate.remote(STOP_GRACE_S) for a in h.actors]
        if refs:
            with contextlib.suppress(Exception):  # the actors may already be dead
                self._ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S + 5)
        for actor in h.actors:
            try:
                self._ray.kill(actor)
            except Exception:
                log.debug("actor already gone", exc_info=True)
        try:
            remove_placement_group(h.pg)
        except Exception:
            log.debug("placement group already gone", exc_info=True)
        log.info("allocation %s: workers stopped, group removed", h.launch.allocation_id)


def _master_port() -> int:
    """A free port for rank 0's rendezvous (torch.distributed's store), taken outside the
    kernel's ephemeral range and Ray's worker ports (10002-19999): a port from the ephemeral
    range can be taken as the source port of some outgoing connection before the
    entrypoint binds it."""
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


class _NotPlaced(Exception):
    """The placement group was not placed in time: the capacity is not really there."""


def _gcs_address(ray: Any) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return os.environ.get("RAY_ADDRESS", "auto")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]
