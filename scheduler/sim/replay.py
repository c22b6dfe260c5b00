"""Discrete-event trace replay: run a policy function against a job trace on a fixed fleet.

The simulator owns the clock and the cluster state; the policy stays the same pure function
that the live loop calls. Model (all times integer seconds, from the trace's first submit):

* The policy runs once per cycle, at multiples of ``cycle_s``, and only in cycles where
  something changed (a submit, an end, a stop, a placement in the previous cycle, or a
  reservation coming due); other cycles are skipped, jumping to the next event. A job
  submitted at ``s`` joins the queue at the first cycle at or after ``s``; a gang started
  at cycle ``t`` holds its GPUs until it ends; they are free again from the next cycle.
* A preemption asks its victims to stop: they keep their GPUs (and keep computing) for
  ``grace_s``, then stop. A job that checkpoints every ``checkpoint_s`` seconds of its run
  keeps the work up to its last checkpoint and resumes from it; the rest is lost work.
  A job without checkpoints restarts from scratch. The preempting job is placed by a later
  cycle, once the GPUs are free, like any other.
* ``wait_s`` of a job is the total time it spent queued (including after preemptions), so
  ``jct_s == wait_s + time held by its runs``.
* Fairness input: each provider's committed GPU-seconds for the current 30-day period, pro
  rata to now, and what it delivered in the period so far (GPU-seconds held on it).
* Every decision is validated (``scheduler.policy.validate``); an invalid decision raises
  :class:`InvalidDecision` rather than being silently repaired.
* If jobs remain queued while nothing runs, nothing is due to arrive and the policy places
  and preempts nothing, they can never run: the replay stops and reports them in
  ``unfinished``.

``time.perf_counter`` measures the policy's wall time here, never inside the policy.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from scheduler.domain.enums import CommitmentLevel
from scheduler.policy.types import (
    JobRequest,
    NodeView,
    Placement,
    PolicyFn,
    ProviderState,
    RunningAllocation,
)
from scheduler.policy.validate import InvalidDecision
from scheduler.policy.validate import validate as validate_decision

logger = logging.getLogger(__name__)

MONTH_S = 30 * 86400

__all__ = ["InvalidDecision", "JobOutcome", "NodeSpec", "ReplayResult", "TraceJob", "replay"]


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
    site_name: str = ""


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
    checkpoint_s: int | None = None  # checkpoints every this many seconds of a run
    max_runtime_s: int | None = None  # what the user declared (the policy sees it)
    team: str = ""

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
    busy_gpu_s: int  # GPU-seconds held by gangs, lost work and grace periods included
    useful_gpu_s: int  # GPU-seconds of work kept (completed jobs' work)
    lost_gpu_s: int
    preemptions: int
    # Over the time when at least one job was queued: GPU capacity, and GPU-seconds held.
    # Their ratio shows GPUs left idle while work waited (fragmentation, constraints,
    # head-of-line blocking), which utilisation over the whole makespan hides.
    contended_capacity_gpu_s: int = 0
    contended_busy_gpu_s: int = 0
    policy_s: list[float] = field(default_factory=list)  # wall time of each policy call
    # GPU-seconds held, per provider and per level, within [0, window_s] (the trace's span)
    window_s: int = 0
    provider_gpu_s: dict[int, int] = field(default_factory=dict)
    level_gpu_s: dict[str, int] = field(default_factory=dict)
    committed_gpu_s: dict[int, int] = field(default_factory=dict)  # over the window

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

    def fulfilment(self) -> dict[int, float]:
        """Delivered / committed GPU-seconds over the window, per committed provider."""
        return {p: self.provider_gpu_s.get(p, 0) / c for p, c in self.committed_gpu_s.items() if c}

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
    end_s: int  # when it completes if nothing stops it
    gpus: tuple[tuple[int, int], ...]
    level: str
    view: RunningAllocation
    stop_s: int | None = None  # asked to stop: its GPUs are free from here


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
        checkpointing=job.checkpoint_s is not None,
        max_runtime_s=job.max_runtime_s,
        submitted_s=job.submit_s,
        team=job.team,
    )


def replay(
    jobs: Sequence[TraceJob],
    cluster: Sequence[NodeSpecLike],
    policy_fn: PolicyFn,
    *,
    cycle_s: int = 60,
    grace_s: int = 30,
    commitments: dict[int, int] | None = None,
    validate: bool = True,
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Replay ``jobs`` on ``cluster`` under ``policy_fn``; see the module docstring.

    ``commitments``: committed GPU-seconds per 30-day period, per provider id (fairness
    input and the fulfilment figures). ``progress`` is called with the number of jobs
    finished so far, now and then."""
    if cycle_s < 1:
        raise ValueError("cycle_s must be >= 1")
    nodes = {n.node_id: n for n in cluster}
    if len(nodes) != len(cluster):
        raise ValueError("duplicate node ids in cluster")
    commitments = dict(commitments or {})
    free: dict[int, set[int]] = {n.node_id: set(range(n.total_gpus)) for n in cluster}
    total_gpus = sum(n.total_gpus for n in cluster)
    arrivals = sorted(jobs, key=lambda j: (j.submit_s, j.job_id))
    seq_of = {j.job_id: i for i, j in enumerate(arrivals)}
    if len(seq_of) != len(arrivals):
        raise ValueError("duplicate job ids in trace")
    window = arrivals[-1].submit_s if arrivals else 0
    outcomes = {j.job_id: JobOutcome(j) for j in arrivals}
    requests = {j.job_id: _request(j, seq_of[j.job_id]) for j in arrivals}
    done_work: dict[int, int] = {}  # job -> seconds of work kept by checkpoints
    queued: dict[int, int] = {}  # job_id -> time it (re)joined the queue
    running: dict[int, _Run] = {}  # allocation_id -> run
    ends: list[tuple[int, int]] = []  # heap of (time, allocation_id): completions and stops
    views: dict[int, NodeView] = {}
    dirty: set[int] = set(nodes)  # nodes whose view must be rebuilt
    next_arrival = 0
    next_alloc = 1
    busy = useful = lost = preemptions = 0
    provider_gpu_s: dict[int, int] = {}
    level_gpu_s: dict[str, int] = {}
    period_closed: dict[int, int] = {}  # provider -> GPU-seconds closed in this period
    period = 0
    policy_s: list[float] = []
    makespan = 0
    held = 0  # GPUs held by gangs
    contended_cap = contended_busy = 0
    was_waiting = False
    finished = 0
    t_prev = t = 0
    must_run = True
    wake_at: int | None = None  # a reservation's start: run the policy then

    def account(run: _Run, until: int) -> None:
        """Book the GPU-seconds ``run`` held, [start, until), to its provider and level."""
        nonlocal busy
        g = run.job.num_gpus
        busy += g * (until - run.start_s)
        inside = max(0, min(until, window) - run.start_s) if window else until - run.start_s
        pid = run.placement.provider_id
        provider_gpu_s[pid] = provider_gpu_s.get(pid, 0) + g * inside
        level_gpu_s[run.level] = level_gpu_s.get(run.level, 0) + g * inside
        start_in_period = max(run.start_s, period * MONTH_S)
        if until > start_in_period:
            period_closed[pid] = period_closed.get(pid, 0) + g * (until - start_in_period)

    def release(run: _Run) -> None:
        nonlocal held
        for node_id, gpu in run.gpus:
            free[node_id].add(gpu)
            dirty.add(node_id)
        held -= run.job.num_gpus

    while next_arrival < len(arrivals) or queued or running:
        if t // MONTH_S != period:
            period = t // MONTH_S
            period_closed.clear()
        if was_waiting:
            contended_cap += total_gpus * (t - t_prev)
            contended_busy += held * (t - t_prev)
        while ends and ends[0][0] <= t:
            at, aid = heapq.heappop(ends)
            run = running.get(aid)
            if run is None or at != (run.stop_s if run.stop_s is not None else run.end_s):
                continue  # stale entry
            del running[aid]
            release(run)
            if was_waiting:  # not held between its end and this cycle
                contended_busy -= run.job.num_gpus * (t - at)
            account(run, at)
            outcome = outcomes[run.job.job_id]
            if run.stop_s is None or run.end_s <= run.stop_s:  # completed
                outcome.finish_s = run.end_s
                makespan = max(makespan, run.end_s)
                useful += run.job.gpu_seconds
                finished += 1
            else:  # stopped: keep the work up to its last checkpoint
                ran = run.stop_s - run.start_s
                every = run.job.checkpoint_s
                kept = (ran // every) * every if every else 0
                if every is None:
                    done_work.pop(run.job.job_id, None)  # restarts from scratch
                else:
                    done_work[run.job.job_id] = done_work.get(run.job.job_id, 0) + kept
                wasted = run.job.num_gpus * (ran - kept)
                lost += wasted
                outcome.lost_gpu_s += wasted
                queued[run.job.job_id] = at
            must_run = True
        while next_arrival < len(arrivals) and arrivals[next_arrival].submit_s <= t:
            job = arrivals[next_arrival]
            queued[job.job_id] = job.submit_s
            next_arrival += 1
            must_run = True
        if wake_at is not None and t >= wake_at:
            must_run, wake_at = True, None

        placed_any = False
        if must_run and queued:
            for node_id in dirty:
                n = nodes[node_id]
                views[node_id] = NodeView(
                    node_id=n.node_id,
                    name=n.name,
                    provider_id=n.provider_id,
                    level=n.level,
                    gpu_model=n.gpu_model,
                    gpu_memory_bytes=n.gpu_memory_bytes,
                    free_gpu_ids=tuple(sorted(free[node_id])),
                    total_gpus=n.total_gpus,
                    site_id=n.site_id,
                    site_name=getattr(n, "site_name", ""),
                )
            dirty.clear()
            node_views = list(views.values())
            allocs = [_with_checkpoint(r, t) for r in running.values()]
            queue = list(map(requests.__getitem__, queued))
            providers = _provider_states(commitments, period_closed, running, t, period)
            started = time.perf_counter()
            decision = policy_fn(queue, node_views, allocs, now_s=t, providers=providers)
            policy_s.append(time.perf_counter() - started)
            if validate:
                validate_decision(decision, queue, node_views, allocs, now_s=t)
            for pre in decision.preemptions:
                for aid in pre.victims:
                    victim = running[aid]
                    victim.stop_s = min(pre.deadline_s, victim.end_s)
                    victim.view = _stopping(victim.view, victim.stop_s, pre.job_id)
                    if victim.stop_s < victim.end_s:
                        preemptions += 1
                        outcomes[victim.job.job_id].preemptions += 1
                        heapq.heappush(ends, (victim.stop_s, aid))
                placed_any = True
            for placement in decision.placements:
                job = outcomes[placement.job_id].job
                gpus = tuple((w.node_id, g) for w in placement.workers for g in w.gpu_ids)
                for node_id, gpu in gpus:
                    free[node_id].remove(gpu)
                    dirty.add(node_id)
                outcome = outcomes[job.job_id]
                outcome.wait_s += t - queued.pop(job.job_id)
                if outcome.first_start_s is None:
                    outcome.first_start_s = t
                remaining = job.duration_s - done_work.get(job.job_id, 0)
                level = nodes[placement.workers[0].node_id].level.value
                view = RunningAllocation(
                    allocation_id=next_alloc,
                    job_id=job.job_id,
                    priority=job.priority,
                    preemptible=job.preemptible,
                    provider_id=placement.provider_id,
                    started_at_s=t,
                    gpus=gpus,
                    site_id=placement.site_id,
                    expected_end_s=t + job.max_runtime_s if job.max_runtime_s else None,
                )
                run = _Run(next_alloc, job, placement, t, t + remaining, gpus, level, view)
                running[next_alloc] = run
                held += job.num_gpus
                heapq.heappush(ends, (run.end_s, next_alloc))
                next_alloc += 1
                placed_any = True
            if decision.reservations:
                soonest = min(r.start_s for r in decision.reservations.values())
                if soonest > t:
                    wake_at = soonest if wake_at is None else min(wake_at, soonest)
            if progress is not None:
                progress(finished)
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
        if wake_at is not None and queued:
            upcoming.append(wake_at)
        if not upcoming:
            if queued:
                logger.warning("%d jobs can never be placed; stopping the replay", len(queued))
            break
        t = max(t + cycle_s, -(-min(upcoming) // cycle_s) * cycle_s)
        must_run = True

    committed = {p: c * window // MONTH_S for p, c in commitments.items()}
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
        window_s=window,
        provider_gpu_s=provider_gpu_s,
        level_gpu_s=level_gpu_s,
        committed_gpu_s=committed,
    )


def _with_checkpoint(run: _Run, t: int) -> RunningAllocation:
    """The run's view with its latest checkpoint as of ``t`` (the policy's loss input)."""
    every = run.job.checkpoint_s
    if not every or t - run.start_s < every:
        return run.view
    last = run.start_s + ((t - run.start_s) // every) * every
    if run.view.last_checkpoint_s == last:
        return run.view
    run.view = _replace_ckpt(run.view, last)
    return run.view


def _replace_ckpt(view: RunningAllocation, last: int) -> RunningAllocation:
    return replace(view, last_checkpoint_s=last)


def _stopping(view: RunningAllocation, until: int, for_job: int) -> RunningAllocation:
    return replace(view, stopping_until_s=until, stopping_for_job=for_job)


def _provider_states(
    commitments: dict[int, int],
    closed: dict[int, int],
    running: dict[int, _Run],
    t: int,
    period: int,
) -> list[ProviderState]:
    if not commitments:
        return []
    start = period * MONTH_S
    delivered = dict(closed)
    for run in running.values():
        pid = run.placement.provider_id
        if pid in commitments:
            delivered[pid] = delivered.get(pid, 0) + run.job.num_gpus * (
                t - max(start, run.start_s)
            )
    return [
        ProviderState(pid, c * (t - start) // MONTH_S, delivered.get(pid, 0))
        for pid, c in sorted(commitments.items())
    ]
