"""Runs a site's allocations on the site's own Ray cluster.

Per allocation: one placement group, one bundle (``{"CPU": 1, "GPU": n}``) per worker, each
bundle pinned to the node the control plane chose by its label (``bundle_label_selector``);
one actor per bundle runs that rank's entrypoint as a subprocess in its own process group.
Groups and actors are **detached** and **named** in the site's namespace
(``a{allocation}`` and ``a{allocation}-r{rank}``), so they outlive the agent: an agent that
restarts finds them again with :meth:`SiteLauncher.discover` and carries on.

Life of an allocation (advanced by :meth:`poll`, which never blocks):

    reserving  the group is created; waiting until Ray has placed every bundle
    launching  one actor per bundle; rank 0 reports its address and a free port
    running    every rank's entrypoint runs (event ``started``: GPU-seconds count from here)
    done       every rank exited 0, or one failed and the rest were stopped
               (``finished``); or an actor died with its node, or Ray never placed the
               gang (``lost``)
    stopping   the control plane asked it to stop (cancel, preemption, reclaim): every
               rank got SIGTERM and its deadline; once all have exited, or the grace is
               over and what is left was killed, it is torn down (``stopped``)

A stop never blocks the agent: the grace runs inside the workers, and :meth:`poll` notices
when they are done. While stopping, the allocation is still active here (its GPUs are
held), so the control plane never mistakes it for gone.

A finished or lost allocation keeps its actors (and so its exit codes) until the agent has
told the control plane and calls :meth:`teardown`: an agent killed in between finds the
result again on restart, so a job that finished is never run twice.

What an entrypoint gets (``worker.py``): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
CUDA_VISIBLE_DEVICES, the job's own env, ANDROMEDA_* facts (ANDROMEDA_CHECKPOINT to resume
from, ANDROMEDA_CHECKPOINT_MARKER to touch after each checkpoint, ANDROMEDA_PREEMPT_DEADLINE_FILE
written before a graceful stop's SIGTERM), and a short allow-list of the
host's variables (PATH, HOME, locale, CUDA/NCCL settings). Never RAY_ADDRESS, the Ray
token or its path, or any other RAY_* variable: a job cannot drive the site's Ray cluster.

This module and the actor it starts (``worker.py``) are the only ones that import ``ray``,
lazily: here in :meth:`SiteLauncher.connect`, there in the worker process itself.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agents.site.worker import Worker
from scheduler.domain.labels import NODE_LABEL
from scheduler.schemas import Assignment

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
FAILED_PEERS_GRACE_S = 5.0  # when one rank fails, how long the others get to exit
LEFTOVER_GRACE_S = 2.0  # background children of an entrypoint that has exited
STOP_SLACK_S = 15.0  # past a stop's grace, how long to wait for the workers' own answer
LOG_TAIL_BYTES = 64_000
_ACTOR_NAME = re.compile(r"^a(\d+)-r(\d+)$")
_PG_NAME = re.compile(r"^a(\d+)$")


def namespace_of(site: str) -> str:
    return f"andromeda-site-{site}"


@dataclass(frozen=True, slots=True)
class LaunchEvent:
    """A fact about one allocation for the control plane (``scheduler.schemas.SiteEvent``)."""

    allocation_id: int
    kind: str  # started | finished | lost | stopped
    at: datetime
    exit_codes: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    failed_rank: int | None = None
    logs: dict[int, str] = field(default_factory=dict)


@dataclass
class _Handle:
    allocation_id: int
    ranks: list[int]
    nodes: list[str]
    pg: Any
    assignment: Assignment | None = None  # None for one found again after a restart
    package: Any = None  # ObjectRef of the verified code zip, in Ray's object store
    phase: str = "reserving"
    ready_ref: Any = None
    actors: list[Any] = field(default_factory=list)
    address_ref: Any = None
    launch_refs: dict[Any, int] = field(default_factory=dict)
    started_at: dict[int, float] = field(default_factory=dict)
    wait_refs: dict[Any, int] = field(default_factory=dict)
    exit_codes: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    failed_rank: int | None = None
    started_reported: bool = False
    created: float = field(default_factory=time.monotonic)
    missing_since: float | None = None
    stop_refs: list[Any] = field(default_factory=list)
    stop_until: float = 0.0  # monotonic: the grace's end, when what is left is killed
    checkpoint_ref: Any = None  # rank 0's checkpoint marker time, being asked


class SiteLauncher:
    """Carries out one site's assignments on its Ray cluster (module docstring)."""

    def __init__(
        self,
        address: str,
        site: str,
        *,
        scratch_root: Path,
        checkpoint_root: Path,
        reserve_timeout_s: float = 120.0,
        missing_node_grace_s: float = 15.0,
    ) -> None:
        self.address = address
        self.site = site
        self.namespace = namespace_of(site)
        self.scratch_root = scratch_root
        self.checkpoint_root = checkpoint_root
        self.reserve_timeout_s = reserve_timeout_s
        self.missing_node_grace_s = missing_node_grace_s
        self._ray: Any = None
        self._worker_cls: Any = None
        self._handles: dict[int, _Handle] = {}
        self._lock = threading.RLock()

    # --- connecting ------------------------------------------------------------------------
    def connect(self, timeout_s: float = 120.0) -> None:
        """Join the site's Ray cluster as its driver; retries while the head comes up."""
        import ray

        self._ray = ray
        # ray.init from a thread warns that it cannot set its SIGTERM handler: the agent
        # handles signals itself, so that warning is noise.
        logging.getLogger("ray._private.worker").setLevel(logging.ERROR)
        deadline = time.monotonic() + timeout_s
        while not ray.is_initialized():  # (tests share one driver across launchers)
            try:
                ray.init(
                    address=self.address,
                    namespace=self.namespace,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                )
            except (ConnectionError, RuntimeError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"cannot reach Ray at {self.address} (is the site's head up, and is "
                        f"its token in RAY_AUTH_TOKEN_PATH?): {exc}"
                    ) from exc
                time.sleep(1.0)
        # threaded actor: tail(), status() and terminate() are served while wait() blocks
        self._worker_cls = ray.remote(num_cpus=1, max_concurrency=8)(Worker)  # type: ignore[call-overload]
        log.info("connected to the Ray cluster of site %s at %s", self.site, self.address)

    def close(self) -> None:
        """Leave Ray; the detached groups and actors (the running work) stay."""
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()

    def alive_nodes(self) -> list[str]:
        """Names of the nodes (by their label) that Ray reports alive in this cluster."""
        return sorted(
            str(n["Labels"][NODE_LABEL])
            for n in self._ray.nodes()
            if n.get("Alive") and NODE_LABEL in (n.get("Labels") or {})
        )

    def discover(self) -> set[int]:
        """Find the allocations this site runs from a previous agent's life; returns them."""
        ray = self._ray
        by_alloc: dict[int, dict[int, Any]] = {}
        for name in ray.util.list_named_actors():
            m = _ACTOR_NAME.match(name)
            if m:
                with contextlib.suppress(ValueError):
                    by_alloc.setdefault(int(m.group(1)), {})[int(m.group(2))] = ray.get_actor(name)
        groups: dict[int, Any] = {}
        for info in ray.util.placement_group_table().values():
            m = _PG_NAME.match(str(info.get("name", "")))
            if m and info.get("state") != "REMOVED":
                with contextlib.suppress(ValueError):
                    groups[int(m.group(1))] = ray.util.get_placement_group(info["name"])
        found: set[int] = set()
        for alloc_id, pg in groups.items():
            actors = by_alloc.get(alloc_id, {})
            if not actors:  # the agent died before it created any worker: start over
                self._remove_group(pg)
                continue
            ranks = sorted(actors)
            handle = _Handle(alloc_id, ranks, ["?"] * len(ranks), pg)
            handle.actors = [actors[r] for r in ranks]
            try:
                self._resume(handle)
            except Exception as exc:  # its actors died meanwhile
                handle.phase, handle.error = "lost", _describe(exc)
            with self._lock:
                self._handles[alloc_id] = handle
            found.add(alloc_id)
        for alloc_id, actors in by_alloc.items():
            if alloc_id not in groups:  # workers without their group: nothing to resume
                for actor in actors.values():
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
        if found:
            log.info("found allocations %s still running on site %s", sorted(found), self.site)
        return found

    def _resume(self, h: _Handle) -> None:
        """Rebuild a found allocation's state from its actors' own records."""
        statuses = self._ray.get([a.status.remote() for a in h.actors], timeout=30)
        for rank, (started, code, _exited) in zip(h.ranks, statuses, strict=True):
            if started is not None:
                h.started_at[rank] = started
            if code is not None:
                h.exit_codes[rank] = code
        if len(h.started_at) < len(h.ranks) and not h.exit_codes:
            # It died between creating its workers and starting them all: never started.
            h.phase = "lost"
            h.error = "the site's agent restarted while this gang was being launched"
            return
        h.phase = "running"
        for actor, rank in zip(h.actors, h.ranks, strict=True):
            if rank not in h.exit_codes:
                h.wait_refs[actor.wait.remote()] = rank
        self._check_exits(h)

    # --- carrying out assignments ----------------------------------------------------------
    def active(self) -> set[int]:
        with self._lock:
            return set(self._handles)

    def starting(self) -> bool:
        """Whether a gang is being placed or launched (worth polling Ray more often)."""
        with self._lock:
            return any(h.phase in ("reserving", "launching") for h in self._handles.values())

    def start(self, a: Assignment, *, package: Path | None) -> None:
        """Create the allocation's placement group; returns at once (see :meth:`poll`).
        ``package`` is the job's verified code zip, or None; Ray's object store carries it
        to the nodes, where each rank unpacks it as its working directory."""
        from ray.util.placement_group import placement_group

        bundles = [{"CPU": 1.0, "GPU": float(len(w.gpu_uuids))} for w in a.workers]
        selectors = [{NODE_LABEL: w.node} for w in a.workers]
        stale = self._existing_group(a.allocation_id)
        if stale is not None:
            self._remove_group(stale)
        pg = placement_group(
            bundles,
            strategy="PACK",
            name=f"a{a.allocation_id}",
            lifetime="detached",
            bundle_label_selector=selectors,
        )
        handle = _Handle(
            a.allocation_id,
            [w.rank for w in a.workers],
            [w.node for w in a.workers],
            pg,
            a,
            package=self._ray.put(package.read_bytes()) if package else None,
        )
        handle.ready_ref = pg.ready()
        with self._lock:
            self._handles[a.allocation_id] = handle
        log.info(
            "allocation %s (%s): placement group on %s",
            a.allocation_id,
            a.job_name,
            [w.node for w in a.workers],
        )

    def poll(self) -> list[LaunchEvent]:
        """Advance every allocation; the events of what changed since the last call."""
        events: list[LaunchEvent] = []
        alive: set[str] | None = None
        with self._lock:
            handles = list(self._handles.values())
        for h in handles:
            if h.phase == "done":
                continue
            if h.phase == "stopping":
                event = self._check_stopped(h)
                if event is not None:
                    events.append(event)
                continue
            try:
                if h.phase == "reserving":
                    alive = alive if alive is not None else set(self.alive_nodes())
                self._advance(h, alive)
            except self._ray.exceptions.RayActorError as exc:
                h.phase, h.error = "lost", h.error or _describe(exc)
            except _NotPlaced as exc:
                h.phase, h.error = "lost", str(exc)
            except Exception as exc:  # the entrypoint could not start (bad working_dir, ...)
                h.phase, h.error = "failed", h.error or _describe(exc)
                h.failed_rank = h.failed_rank if h.failed_rank is not None else h.ranks[0]
            if len(h.started_at) == len(h.ranks) and not h.started_reported:
                h.started_reported = True  # also when it ran and ended within this poll
                events.append(self._event(h, "started", at=max(h.started_at.values())))
            if h.phase in ("succeeded", "failed", "lost"):
                events.append(self._finish(h))
        return events

    def stop(self, allocation_id: int, grace_s: float = STOP_GRACE_S) -> LaunchEvent | None:
        """Stop an allocation as the control plane asked: its workers get SIGTERM, with
        their deadline written to ``ANDROMEDA_PREEMPT_DEADLINE_FILE`` first, and ``grace_s``
        to checkpoint and exit. Returns at once: :meth:`poll` reports ``stopped`` when they
        are done. A gang whose workers never started is stopped here and now (its event is
        returned). None if it is not here, or is already stopping."""
        with self._lock:
            h = self._handles.get(allocation_id)
            if h is None or h.phase == "stopping":
                return None
            if h.phase in ("reserving", "launching") or not h.actors:
                self._handles.pop(allocation_id, None)
            else:
                h.phase = "stopping"
        if h.phase != "stopping":
            self._terminate(h, min(grace_s, LEFTOVER_GRACE_S))
            self._teardown(h)
            return self._event(h, "stopped", at=_now())
        deadline = time.time() + grace_s
        h.stop_until = time.monotonic() + grace_s
        h.stop_refs = [a.terminate.remote(grace_s, deadline) for a in h.actors]
        log.info("allocation %s: stopping, grace %.0fs", allocation_id, grace_s)
        return None

    def checkpoints(self) -> dict[int, datetime]:
        """When rank 0 of each running allocation last touched its checkpoint marker (only
        those that did). Non-blocking: each call collects the answers the last one asked."""
        out: dict[int, datetime] = {}
        with self._lock:
            handles = [h for h in self._handles.values() if h.phase == "running" and h.actors]
        for h in handles:
            ref = h.checkpoint_ref
            if ref is not None:
                ready, _ = self._ray.wait([ref], timeout=0)
                if not ready:
                    continue
                with contextlib.suppress(Exception):
                    at = self._ray.get(ref)
                    if at is not None:
                        out[h.allocation_id] = datetime.fromtimestamp(at, UTC)
            h.checkpoint_ref = h.actors[0].checkpointed_at.remote()
        return out

    def _check_stopped(self, h: _Handle) -> LaunchEvent | None:
        """The ``stopped`` event of a stopping gang once every rank exited (or the grace
        is over and what was left has been killed); None while it is still stopping."""
        done, _ = self._ray.wait(h.stop_refs, num_returns=len(h.stop_refs), timeout=0)
        if len(done) < len(h.stop_refs) and time.monotonic() < h.stop_until + STOP_SLACK_S:
            return None
        ended = self._collect_exits(h)
        logs = self._collect_logs(h)
        self._teardown(h)
        with self._lock:
            self._handles.pop(h.allocation_id, None)
        return self._event(h, "stopped", at=ended if ended is not None else _now(), logs=logs)

    def teardown(self, allocation_id: int) -> None:
        """Free a finished allocation's resources once the control plane knows the result;
        anything its entrypoints left running in the background is stopped too."""
        with self._lock:
            h = self._handles.pop(allocation_id, None)
        if h is not None:
            self._terminate(h, LEFTOVER_GRACE_S)
            self._teardown(h)

    def tails(self, allocation_id: int) -> dict[int, str]:
        with self._lock:
            h = self._handles.get(allocation_id)
        return self._collect_logs(h) if h is not None and h.actors else {}

    # --- internals ---------------------------------------------------------------------------
    def _advance(self, h: _Handle, alive: set[str] | None) -> None:
        ray = self._ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if h.phase == "reserving":
            ready, _ = ray.wait([h.ready_ref], timeout=0)
            if not ready:
                self._check_placeable(h, alive or set())
                return
            assert h.assignment is not None
            a = h.assignment
            for i, w in enumerate(a.workers):
                options: dict[str, Any] = dict(
                    name=f"a{a.allocation_id}-r{w.rank}",
                    lifetime="detached",
                    max_restarts=0,
                    num_gpus=len(w.gpu_uuids),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=h.pg, placement_group_bundle_index=i
                    ),
                )
                actor = self._worker_cls.options(**options).remote(
                    a.allocation_id, w.rank, str(self.scratch_root)
                )
                h.actors.append(actor)
            h.address_ref = h.actors[0].address.remote()
            h.phase = "launching"
        if h.phase == "launching":
            if h.address_ref is not None:
                ready, _ = ray.wait([h.address_ref], timeout=0)
                if not ready:
                    return
                master_addr, master_port = ray.get(h.address_ref)
                h.address_ref = None
                self._launch_all(h, str(master_addr), int(master_port))
            pending = [r for r in h.launch_refs if h.launch_refs[r] not in h.started_at]
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in done:
                h.started_at[h.launch_refs[ref]] = ray.get(ref)
            if len(h.started_at) == len(h.ranks):
                h.phase = "running"
        if h.phase == "running":
            self._check_exits(h)

    def _launch_all(self, h: _Handle, master_addr: str, master_port: int) -> None:
        assert h.assignment is not None
        a = h.assignment
        world = len(a.workers)
        checkpoint = a.checkpoint_uri or str(self.checkpoint_root / f"job-{a.job_id}")
        for actor, w in zip(h.actors, a.workers, strict=True):
            env = dict(a.env)
            env.update(
                RANK=str(w.rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(w.local_rank),
                MASTER_ADDR=master_addr,
                MASTER_PORT=str(master_port),
                CUDA_VISIBLE_DEVICES=",".join(w.gpu_uuids),
                ANDROMEDA_JOB_ID=str(a.job_id),
                ANDROMEDA_JOB_NAME=a.job_name,
                ANDROMEDA_ALLOCATION_ID=str(a.allocation_id),
                ANDROMEDA_SITE=self.site,
                ANDROMEDA_CHECKPOINT=checkpoint,
            )
            cwd = None if h.package is not None else a.working_dir
            h.launch_refs[actor.launch.remote(a.entrypoint, env, cwd, h.package)] = w.rank
        for actor, w in zip(h.actors, a.workers, strict=True):
            h.wait_refs[actor.wait.remote()] = w.rank

    def _check_exits(self, h: _Handle) -> None:
        ray = self._ray
        pending = [r for r in h.wait_refs if h.wait_refs[r] not in h.exit_codes]
        if pending:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in done:
                h.exit_codes[h.wait_refs[ref]] = ray.get(ref)  # RayActorError: lost
        failed = {r: c for r, c in h.exit_codes.items() if c != 0}
        if failed and h.failed_rank is None:
            rank, code = min(failed.items())
            h.failed_rank = rank
            h.error = f"rank {rank} exited with code {code}"
            h.phase = "failed"
        elif len(h.exit_codes) == len(h.ranks):
            h.phase = "failed" if failed else "succeeded"

    def _check_placeable(self, h: _Handle, alive: set[str]) -> None:
        """Give up on a group Ray cannot place: a node it needs is not in the cluster, or
        the reserve timeout passed."""
        missing = sorted(set(h.nodes) - alive)
        now = time.monotonic()
        if missing:
            h.missing_since = h.missing_since or now
            if now - h.missing_since > self.missing_node_grace_s:
                raise _NotPlaced(
                    f"node {', '.join(missing)} is not alive in site {self.site}'s Ray cluster"
                )
        else:
            h.missing_since = None
        if now - h.created > self.reserve_timeout_s:
            raise _NotPlaced(
                f"Ray did not place the gang within {self.reserve_timeout_s:.0f}s (are the "
                "nodes' Ray workers up with their labels and free GPUs?)"
            )

    def _finish(self, h: _Handle) -> LaunchEvent:
        """Stop what is left of a gang that ended, and describe how it ended: at the moment
        its last worker exited (the workers' own clocks), not when this poll noticed."""
        if h.phase != "succeeded":
            self._terminate(h, FAILED_PEERS_GRACE_S)
        ended = self._collect_exits(h)
        logs = self._collect_logs(h)
        kind = "lost" if h.phase == "lost" else "finished"
        h.phase = "done"
        return self._event(h, kind, at=ended if ended is not None else _now(), logs=logs)

    def _collect_exits(self, h: _Handle) -> float | None:
        """Fill in exit codes from the workers' records; the last exit time, if all told."""
        if not h.actors:
            return None
        try:
            statuses = self._ray.get([a.status.remote() for a in h.actors], timeout=10)
        except Exception:  # a worker died with its node: its record is gone
            return None
        times = []
        for rank, (_started, code, exited) in zip(h.ranks, statuses, strict=True):
            if code is not None:
                h.exit_codes.setdefault(rank, code)
            if exited is not None:
                times.append(exited)
        return max(times) if len(times) == len(h.ranks) else None

    def _event(
        self, h: _Handle, kind: str, *, at: float | datetime, logs: dict[int, str] | None = None
    ) -> LaunchEvent:
        when = at if isinstance(at, datetime) else datetime.fromtimestamp(at, UTC)
        return LaunchEvent(
            allocation_id=h.allocation_id,
            kind=kind,
            at=when,
            exit_codes=dict(h.exit_codes) if kind == "finished" else {},
            error=h.error if kind in ("finished", "lost") else None,
            failed_rank=h.failed_rank if kind == "finished" else None,
            logs=logs or {},
        )

    def _collect_logs(self, h: _Handle) -> dict[int, str]:
        refs = {a.tail.remote(LOG_TAIL_BYTES): r for a, r in zip(h.actors, h.ranks, strict=False)}
        out: dict[int, str] = {}
        for ref, rank in refs.items():
            try:
                out[rank] = self._ray.get(ref, timeout=10)
            except Exception as exc:
                out[rank] = f"<logs unavailable: {_describe(exc)}>"
        return out

    def _terminate(self, h: _Handle, grace_s: float) -> None:
        refs = [a.terminate.remote(grace_s) for a in h.actors]
        if refs:
            with contextlib.suppress(Exception):  # the actors may already be dead
                self._ray.wait(refs, num_returns=len(refs), timeout=grace_s + 10)

    def _teardown(self, h: _Handle) -> None:
        for actor in h.actors:
            try:
                self._ray.kill(actor)
            except Exception:
                log.debug("actor already gone", exc_info=True)
        self._remove_group(h.pg)
        log.info("allocation %s: workers stopped, group removed", h.allocation_id)

    def _existing_group(self, allocation_id: int) -> Any:
        with contextlib.suppress(Exception):
            return self._ray.util.get_placement_group(f"a{allocation_id}")
        return None

    def _remove_group(self, pg: Any) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(pg)
        except Exception:
            log.debug("placement group already gone", exc_info=True)


def _now() -> datetime:
    return datetime.now(UTC)


class _NotPlaced(Exception):
    """Ray cannot place the gang: the capacity is not really there."""


def _describe(exc: BaseException) -> str:
    """One readable line: the error a worker raised (``RayTaskError.cause``), not its repr;
    our own FileNotFoundError ("working_dir X does not exist on node Y") as it is."""
    inner = getattr(exc, "cause", None)
    cause = inner if isinstance(inner, BaseException) else exc
    lines = str(cause).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(cause, FileNotFoundError):
        return first[:500]
    return f"{type(cause).__name__}: {first}"[:500]
