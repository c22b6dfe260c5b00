"""Discrete-event trace replay: run a policy function against a job trace on a fixed cluster.

The simulator owns the clock and the cluster state; the policy stays the same pure function
that the live loop calls. Model (all times integer seconds, from the trace's first submit):

* The policy runs once per cycle, at multiples of ``cycle_s``. A job submitted at ``s``
  joins the queue at the first cycle at or after ``s``; a gang started at cycle ``t`` holds
  its GPUs until ``t + duration_s``; they are free again from the first cycle at or after.
* A preempted job goes back to the queue (keeping its submission order) and restarts from
  scratch: the GPU-seconds it had run are counted as lost work.
* ``wait_s`` of a job is the total time it spent queued (including after preemptions), so
  ``jct_s == wait_s + lost run time + duration_s``.
* Cycles in which nothing can have changed (no submission, completion or placement since a
  cycle that placed nothing) are skipped, jumping to the cycle of the next event. This is
  exact for policies that are functions of (queue, nodes, running), which both built-in
  policies are (``now_s`` is passed but not used by them).
* Every decision is validated (GPUs free or freed by the listed victims, one provider per
  gang, model and memory constraints, victims preemptible and of lower priority); an
  invalid decision raises :class:`InvalidDecision` rather than being silently repaired.
* If jobs remain queued while nothing runs, nothing is due to arrive and the policy places
  nothing, they can never run: the replay stops and reports them in ``unfinished``.

``time.perf_counter`` measures the policy's wall time here, never inside the policy.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.domain.enums import CommitmentLevel
from scheduler.policy.placement import node_matches
from scheduler.policy.types import (
    JobRequest,
    NodeView,
    Placement,
    PolicyFn,
    RunningAllocation,
)

logger = logging.getLogger(__name__)


class InvalidDecision(RuntimeError):
    """The policy returned a decision that violates the cluster's physical rules."""


class NodeSpecLike(Protocol):
    """What the replay needs of a node; satisfied by :class:`NodeSpec` and by NodeView."""

    @property
    def node_id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def provider_id(self) -> int: ...
    @property
    def level(self) -> CommitmentLevel: ...
    @property
    def gpu_model(self) -> str: ...
    @property
    def gpu_memory_bytes(self) -> int: ...
    @property
    def total_gpus(self) -> int: ...
    @property
    def site_id(self) -> int: ...


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A simulated node; its GPUs have ids ``0 .. total_gpus - 1`` and are always healthy."""

    node_id: int
    name: str
    provider_id: int
    level: CommitmentLevel
    gpu_model: str
    gpu_memory_bytes: int
    total_gpus: int
    site_id: int = 0


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job of a trace. Invariant: ``num_gpus == num_workers * gpus_per_worker``."""

    job_id: int
    submit_s: int
    duration_s: int
    num_workers: int
    gpus_per_worker: int
    priority: int
    preemptible: bool = True
    gpu_model: str | None = None
    min_gpu_memory_bytes: int | None = None
    label: str = ""  # e.g. the priority class name, for reporting

    @property
    def num_gpus(self) -> int:
        return self.num_workers * self.gpus_per_worker

    @property
    def gpu_seconds(self) -> int:
        return self.num_gpus * self.duration_s


@dataclass(slots=True)
class JobOutcome:
    """What happened to one job. ``finish_s`` is None for a job that never completed."""

    job: TraceJob
    first_start_s: int | None = None
    finish_s: int | None = None
    wait_s: int = 0
    preemptions: int = 0
    lost_gpu_s: int = 0

    @property
    def jct_s(self) -> int | None:
        return None if self.finish_s is None else self.finish_s - self.job.submit_s


@dataclass(slots=True)
class ReplayResult:
    outcomes: list[JobOutcome]
    total_gpus: int
    makespan_s: int  # from time 0 (first submit) to the last completion
    busy_gpu_s: int  # GPU-seconds held by gangs, lost work included
    useful_gpu_s: int  # GPU-seconds of completed runs
    lost_gpu_s: int
    preemptions: int
    # Over the time when at least one job was queued: GPU capacity, and GPU-seconds held.
    # Their ratio shows GPUs left idle while work waited (fragmentation, constraints,
    # head-of-line blocking), which utilisation over the whole makespan hides.
    contended_capacity_gpu_s: int = 0
    contended_busy_gpu_s: int = 0
    policy_s: list[float] = field(default_factory=list)  # wall time of each policy call

    @property
    def unfinished(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.finish_s is None]

    @property
    def utilisation(self) -> float:
        """Fraction of GPU capacity held by gangs over the makespan (lost work included)."""
        span = self.total_gpus * self.makespan_s
        return self.busy_gpu_s / span if span else 0.0

    @property
    def utilisation_while_waiting(self) -> float:
        """Fraction of GPUs held while at least one job was queued."""
        cap = self.contended_capacity_gpu_s
        return self.contended_busy_gpu_s / cap if cap else 0.0

    @property
    def useful_utilisation(self) -> float:
        span = self.total_gpus * self.makespan_s
        return self.useful_gpu_s / span if span else 0.0

    def finished(self, label: str | None = None) -> list[JobOutcome]:
        return [
            o
            for o in self.outcomes
            if o.finish_s is not None and (label is None or o.job.label == label)
        ]


def build_cluster(
    layout: Sequence[tuple[int, CommitmentLevel, int]],
    *,
    gpus_per_node: int = 8,
    gpu_model: str = "H100-80GB",
    gpu_memory_bytes: int = 80 * 10**9,
) -> list[NodeSpec]:
    """Nodes for ``(provider_id, level, node count)`` groups, numbered from 1 in layout order."""
    nodes: list[NodeSpec] = []
    for provider_id, level, count in layout:
        for _ in range(count):
            node_id = len(nodes) + 1
            nodes.append(
                NodeSpec(
                    node_id=node_id,
                    name=f"p{provider_id}-{level.value}-{node_id}",
                    provider_id=provider_id,
                    level=level,
                    gpu_model=gpu_model,
                    gpu_memory_bytes=gpu_memory_bytes,
                    total_gpus=gpus_per_node,
                )
            )
    return nodes


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return float(ordered[index])


@dataclass(slots=True)
class _Run:
    allocation_id: int
    job: TraceJob
    placement: Placement
    start_s: int
    end_s: int
    gpus: tuple[tuple[int, int], ...]


def replay(
    jobs: Sequence[TraceJob],
    cluster: Sequence[NodeSpecLike],
    policy_fn: PolicyFn,
    *,
    cycle_s: int = 60,
) -> ReplayResult:
    """Replay ``jobs`` on ``cluster`` under ``policy_fn``; see the module docstring."""
    if cycle_s < 1:
        raise ValueError("cycle_s must be >= 1")
    nodes = {n.node_id: n for n in cluster}
    if len(nodes) != len(cluster):
        raise ValueError("duplicate node ids in cluster")
    free: dict[int, set[int]] = {n.node_id: set(range(n.total_gpus)) for n in cluster}
    total_gpus = sum(n.total_gpus for n in cluster)

    arrivals = sorted(jobs, key=lambda j: (j.submit_s, j.job_id))
    seq_of = {j.job_id: i for i, j in enumerate(arrivals)}
    if len(seq_of) != len(arrivals):
        raise ValueError("duplicate job ids in trace")
    outcomes = {j.job_id: JobOutcome(j) for j in arrivals}
    queued: dict[int, int] = {}  # job_id -> time it (re)joined the queue
    running: dict[int, _Run] = {}  # allocation_id -> run
    ends: list[tuple[int, int]] = []  # heap of (end_s, allocation_id)
    next_arrival = 0
    next_alloc = 1
    busy = useful = lost = preemptions = 0
    policy_s: list[float] = []
    makespan = 0

    def release(run: _Run) -> None:
        for node_id, gpu in run.gpus:
            free[node_id].add(gpu)

    requests: dict[int, JobRequest] = {j.job_id: _request(j, seq_of[j.job_id]) for j in arrivals}
    held = 0  # GPUs held by running gangs
    contended_cap = contended_busy = 0
    was_waiting = False  # a job was queued after the previous iteration's decisions
    t_prev = 0
    t = 0
    must_run = True
    while next_arrival < len(arrivals) or queued or running:
        if was_waiting:
            contended_cap += total_gpus * (t - t_prev)
            contended_busy += held * (t - t_prev)
        while ends and ends[0][0] <= t:
            end_s, aid = heapq.heappop(ends)
            run = running.pop(aid, None)
            if run is None or run.end_s != end_s:
                continue  # preempted earlier; stale heap entry
            release(run)
            held -= run.job.num_gpus
            if was_waiting:  # not held between its end and this cycle
                contended_busy -= run.job.num_gpus * (t - end_s)
            outcome = outcomes[run.job.job_id]
            outcome.finish_s = end_s
            makespan = max(makespan, end_s)
            busy += run.job.num_gpus * (end_s - run.start_s)
            useful += run.job.gpu_seconds
            must_run = True
        while next_arrival < len(arrivals) and arrivals[next_arrival].submit_s <= t:
            job = arrivals[next_arrival]
            queued[job.job_id] = job.submit_s
            next_arrival += 1
            must_run = True

        placed_any = False
        if must_run and queued:
            queue = [requests[jid] for jid in queued]
            views = [
                NodeView(
                    node_id=n.node_id,
                    name=n.name,
                    provider_id=n.provider_id,
                    level=n.level,
                    gpu_model=n.gpu_model,
                    gpu_memory_bytes=n.gpu_memory_bytes,
                    free_gpu_ids=tuple(sorted(free[n.node_id])),
                    total_gpus=n.total_gpus,
                    site_id=n.site_id,
                )
                for n in cluster
            ]
            allocs = [
                RunningAllocation(
                    allocation_id=r.allocation_id,
                    job_id=r.job.job_id,
                    priority=r.job.priority,
                    preemptible=r.job.preemptible,
                    provider_id=r.placement.provider_id,
                    started_at_s=r.start_s,
                    gpus=r.gpus,
                    site_id=r.placement.site_id,
                )
                for r in running.values()
            ]
            started = time.perf_counter()
            decision = policy_fn(queue, views, allocs, now_s=t)
            policy_s.append(time.perf_counter() - started)
            for placement in decision.placements:
                if placement.job_id not in queued:
                    raise InvalidDecision(f"job {placement.job_id} is not queued")
                job = outcomes[placement.job_id].job
                victims = []
                for aid in placement.preempts:
                    victim = running.get(aid)
                    if victim is None:
                        raise InvalidDecision(f"allocation {aid} is not running")
                    if not victim.job.preemptible or victim.job.priority >= job.priority:
                        raise InvalidDecision(f"allocation {aid} may not be preempted")
                    victims.append(victim)
                for victim in victims:
                    del running[victim.allocation_id]
                    release(victim)
                    held -= victim.job.num_gpus
                    ran = victim.job.num_gpus * (t - victim.start_s)
                    busy += ran
                    lost += ran
                    preemptions += 1
                    v_out = outcomes[victim.job.job_id]
                    v_out.preemptions += 1
                    v_out.lost_gpu_s += ran
                    queued[victim.job.job_id] = t
                gpus = _validate(placement, job, nodes, free)
                for node_id, gpu in gpus:
                    free[node_id].remove(gpu)
                outcome = outcomes[job.job_id]
                outcome.wait_s += t - queued.pop(job.job_id)
                if outcome.first_start_s is None:
                    outcome.first_start_s = t
                run = _Run(next_alloc, job, placement, t, t + job.duration_s, gpus)
                running[next_alloc] = run
                held += job.num_gpus
                heapq.heappush(ends, (run.end_s, next_alloc))
                next_alloc += 1
                placed_any = True
        must_run = placed_any
        was_waiting = bool(queued)
        t_prev = t

        if must_run:
            t += cycle_s
            continue
        upcoming = []
        if ends:
            upcoming.append(ends[0][0])
        if next_arrival < len(arrivals):
            upcoming.append(arrivals[next_arrival].submit_s)
        if not upcoming:
            if queued:
                logger.warning("%d jobs can never be placed; stopping the replay", len(queued))
            break
        t = max(t + cycle_s, -(-min(upcoming) // cycle_s) * cycle_s)
        must_run = True

    return ReplayResult(
        outcomes=[outcomes[j.job_id] for j in arrivals],
        total_gpus=total_gpus,
        makespan_s=makespan,
        busy_gpu_s=busy,
        useful_gpu_s=useful,
        lost_gpu_s=lost,
        preemptions=preemptions,
        contended_capacity_gpu_s=contended_cap,
        contended_busy_gpu_s=contended_busy,
        policy_s=policy_s,
    )


def _request(job: TraceJob, seq: int) -> JobRequest:
    return JobRequest(
        job_id=job.job_id,
        priority=job.priority,
        seq=seq,
        num_workers=job.num_workers,
        gpus_per_worker=job.gpus_per_worker,
        gpu_model=job.gpu_model,
        min_gpu_memory_bytes=job.min_gpu_memory_bytes,
        preemptible=job.preemptible,
    )


def _validate(
    placement: Placement,
    job: TraceJob,
    nodes: dict[int, NodeSpecLike],
    free: dict[int, set[int]],
) -> tuple[tuple[int, int], ...]:
    """The (node, gpu) pairs of a placement, after checking it against the physical rules."""
    if len(placement.workers) != job.num_workers:
        raise InvalidDecision(f"job {job.job_id}: {len(placement.workers)} workers placed")
    gpus: list[tuple[int, int]] = []
    for worker in placement.workers:
        node = nodes.get(worker.node_id)
        if node is None or (node.provider_id, node.site_id) != (
            placement.provider_id,
            placement.site_id,
        ):
            raise InvalidDecision(f"job {job.job_id}: node {worker.node_id} not in the site")
        if not node_matches(_request(job, 0), node.gpu_model, node.gpu_memory_bytes):
            raise InvalidDecision(f"job {job.job_id}: node {node.node_id} does not match")
        if len(worker.gpu_ids) != job.gpus_per_worker:
            raise InvalidDecision(f"job {job.job_id}: worker has {len(worker.gpu_ids)} GPUs")
        for gpu in worker.gpu_ids:
            if gpu not in free[node.node_id]:
                raise InvalidDecision(f"job {job.job_id}: GPU {gpu} on {node.node_id} not free")
            gpus.append((node.node_id, gpu))
    if len(set(gpus)) != len(gpus):
        raise InvalidDecision(f"job {job.job_id}: a GPU is used twice")
    return tuple(gpus)
