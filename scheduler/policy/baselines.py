"""Baseline policies, for the simulator and the benchmarks: what others would do.

- ``fifo_schedule``, strict FIFO: jobs in submission order (``seq``), ignoring priority and
  commitment level; each gang goes to the first site (lowest provider, site id) where every
  worker fits first-fit on nodes in node-id order; no preemption; and the first job that
  does not fit stops the cycle, so every later job waits behind it (head-of-line blocking).
- ``first_fit_schedule``, FIFO first-fit: the same, but a job that does not fit does not
  block later ones. This is what submitting every gang as a plain Ray placement group
  gives: Ray places pending groups in order wherever they fit now, with no notion of
  priority, commitment or preemption.
- ``kueue_like_schedule``: Kueue's rules on the same machinery as ours: priority order,
  BestEffortFIFO, flavours tried in one fixed order (reserved, committed, spot) whatever
  the job, preemption of lower-priority work with victims taken lowest priority first,
  then newest (no minimum runtime, no cost rule), and no backfill reservations, no
  provider fairness.

They keep the physical rules that no policy may break: a gang lies inside one site, a
worker on one node, and nodes must match the job's model and memory constraints. Like
:func:`scheduler.policy.placement.schedule` they are pure and deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from scheduler.domain.enums import CommitmentLevel, PriorityClass
from scheduler.policy.config import PolicyConfig, Steering
from scheduler.policy.constraints import in_force, node_matches
from scheduler.policy.placement import schedule
from scheduler.policy.types import (
    Decision,
    JobRequest,
    NodeView,
    Placement,
    ProviderState,
    RunningAllocation,
    WorkerPlacement,
)


def _first_fit(
    job: JobRequest, nodes: list[NodeView], free: dict[int, list[int]]
) -> tuple[WorkerPlacement, ...] | None:
    """First-fit the gang on one provider's ``nodes`` in id order; mutates ``free`` on success."""
    g = job.gpus_per_worker
    taken: dict[int, int] = {}
    order: list[int] = []
    remaining = job.num_workers
    for node in nodes:
        if not remaining:
            break
        if len(free[node.node_id]) < g or not node_matches(
            job, node.gpu_model, node.gpu_memory_bytes
        ):
            continue
        k = min(len(free[node.node_id]) // g, remaining)
        taken[node.node_id] = k
        order.append(node.node_id)
        remaining -= k
    if remaining:
        return None
    workers: list[WorkerPlacement] = []
    for node_id in order:
        ids = free[node_id]
        for _ in range(taken[node_id]):
            workers.append(WorkerPlacement(len(workers), node_id, tuple(ids[:g])))
            del ids[:g]
    return tuple(workers)


def fifo_schedule(
    queue: Sequence[JobRequest],
    nodes: Sequence[NodeView],
    running: Sequence[RunningAllocation],
    *,
    now_s: int,
    providers: Sequence[ProviderState] = (),
) -> Decision:
    """Place jobs strictly by ``seq`` until the first one that does not fit; see module doc."""
    return _fifo(queue, nodes, now_s, blocking=True)


def first_fit_schedule(
    queue: Sequence[JobRequest],
    nodes: Sequence[NodeView],
    running: Sequence[RunningAllocation],
    *,
    now_s: int,
    providers: Sequence[ProviderState] = (),
) -> Decision:
    """Place jobs by ``seq`` wherever they fit first, skipping those that do not."""
    return _fifo(queue, nodes, now_s, blocking=False)


def _fifo(
    queue: Sequence[JobRequest], nodes: Sequence[NodeView], now_s: int, *, blocking: bool
) -> Decision:
    by_site: dict[tuple[int, int], list[NodeView]] = {}
    free: dict[int, list[int]] = {}
    for node in sorted(nodes, key=lambda n: n.node_id):
        if not in_force(node, now_s):
            continue
        by_site.setdefault(node.site_key, []).append(node)
        free[node.node_id] = sorted(node.free_gpu_ids)
    decision = Decision()
    blocker: JobRequest | None = None
    full: dict[tuple[str | None, int | None, int], int] = {}  # shape -> workers that failed
    for job in sorted(queue, key=lambda j: (j.seq, j.job_id)):
        if blocker is not None:
            decision.pending[job.job_id] = f"behind job {blocker.job_id} (strict FIFO)"
            continue
        shape = (job.gpu_model, job.min_gpu_memory_bytes, job.gpus_per_worker)
        if full.get(shape, job.num_workers + 1) <= job.num_workers:
            decision.pending[job.job_id] = _NO_FIT
            continue
        placed: Placement | None = None
        if job.num_workers >= 1 and job.gpus_per_worker >= 1:
            for provider_id, site_id in sorted(by_site):
                workers = _first_fit(job, by_site[(provider_id, site_id)], free)
                if workers is not None:
                    placed = Placement(job.job_id, provider_id, workers, site_id)
                    break
        if placed is not None:
            decision.placements.append(placed)
            continue
        if blocking:
            blocker = job
            decision.pending[job.job_id] = (
                f"{job.num_workers} workers x {job.gpus_per_worker} GPUs do not fit on free "
                "GPUs of any one provider (strict FIFO: later jobs wait)"
            )
        else:
            full[shape] = job.num_workers
            decision.pending[job.job_id] = _NO_FIT
    return decision


_NO_FIT = "does not fit on the free GPUs of any one site now (first fit, no preemption)"

_KUEUE_FLAVOURS = Steering(
    (CommitmentLevel.reserved, CommitmentLevel.committed, CommitmentLevel.spot)
)
KUEUE_LIKE = PolicyConfig(
    steering={cls: _KUEUE_FLAVOURS for cls in PriorityClass},
    min_runtime_s=0,
    preempt_gain_factor=Fraction(0),
    max_preemptions_per_cycle=10**9,
    backfill=False,
    fairness=False,
    victim_order="priority",
)


def kueue_like_schedule(
    queue: Sequence[JobRequest],
    nodes: Sequence[NodeView],
    running: Sequence[RunningAllocation],
    *,
    now_s: int,
    providers: Sequence[ProviderState] = (),
) -> Decision:
    """Kueue's rules (module docstring) on the same placement machinery as ours."""
    return schedule(queue, nodes, running, now_s=now_s, config=KUEUE_LIKE)
