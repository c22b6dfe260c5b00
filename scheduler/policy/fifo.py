"""Strict-FIFO baseline policy, for benchmarks only.

It is what a naive gang scheduler does: jobs in submission order (``seq``), ignoring
priority and commitment level; each gang goes to the first provider (lowest id) where every
worker fits first-fit on nodes in node-id order; no preemption; and the first job that does
not fit stops the cycle, so every later job waits behind it (head-of-line blocking).

It keeps the physical rules that no policy may break: a gang lies inside one site, a
worker on one node, and nodes must match the job's model and memory constraints. Like
:func:`scheduler.policy.placement.schedule` it is pure and deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.policy.placement import node_matches
from scheduler.policy.types import (
    Decision,
    JobRequest,
    NodeView,
    Placement,
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
) -> Decision:
    """Place jobs strictly by ``seq`` until the first one that does not fit; see module doc."""
    del running, now_s  # no preemption, no time-dependent rules
    by_site: dict[tuple[int, int], list[NodeView]] = {}
    free: dict[int, list[int]] = {}
    for node in sorted(nodes, key=lambda n: n.node_id):
        by_site.setdefault(node.site_key, []).append(node)
        free[node.node_id] = sorted(node.free_gpu_ids)
    decision = Decision()
    blocker: JobRequest | None = None
    for job in sorted(queue, key=lambda j: (j.seq, j.job_id)):
        if blocker is not None:
            decision.pending[job.job_id] = f"behind job {blocker.job_id} (strict FIFO)"
            continue
        placed: Placement | None = None
        if job.num_workers >= 1 and job.gpus_per_worker >= 1:
            for provider_id, site_id in sorted(by_site):
                workers = _first_fit(job, by_site[(provider_id, site_id)], free)
                if workers is not None:
                    placed = Placement(job.job_id, provider_id, workers, (), site_id)
                    break
        if placed is not None:
            decision.placements.append(placed)
            continue
        blocker = job
        decision.pending[job.job_id] = (
            f"{job.num_workers} workers x {job.gpus_per_worker} GPUs do not fit on free GPUs "
            "of any one provider (strict FIFO: later jobs wait)"
        )
    return decision
