"""The one check of a decision against the rules no policy may break.

The simulator runs it on every decision of every policy, the tests on every case, and the
live loop before it acts, so a policy bug shows up as :class:`InvalidDecision` with every
problem listed rather than as a GPU given to two gangs.

Rules: every queued job is placed or pending, once; a placement's workers are exactly
its gang, each on one node of the placement's site, on GPUs that are free, matching the
job's model and memory, on an agreement in force, and (given a config) on a level its
class may use; no GPU is used twice; a preemption's victims are running, not already
stopping, preemptible, of lower priority, in the preemption's site, and each is stopped
for one job only; a job that preempts or holds a reservation is pending.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from scheduler.policy.config import PolicyConfig
from scheduler.policy.constraints import allowed_levels, in_force, node_matches
from scheduler.policy.types import Decision, JobRequest, NodeView, RunningAllocation

_JOB_ID = attrgetter("job_id")


class InvalidDecision(RuntimeError):
    """A decision that breaks the rules; ``problems`` lists each broken rule."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__("; ".join(problems[:5]) + more)


def problems(
    decision: Decision,
    queue: Sequence[JobRequest],
    nodes: Sequence[NodeView],
    running: Sequence[RunningAllocation],
    *,
    now_s: int,
    config: PolicyConfig | None = None,
) -> list[str]:
    """Every rule ``decision`` breaks (empty: it is valid)."""
    out: list[str] = []
    jobs = dict(zip(map(_JOB_ID, queue), queue, strict=True))
    by_node = {n.node_id: n for n in nodes}
    allocs = {a.allocation_id: a for a in running}
    placed = [p.job_id for p in decision.placements]
    pending = decision.pending
    if len(set(placed)) != len(placed):
        out.append("a job is placed twice")
    both = [j for j in placed if j in pending]
    if both:
        out.append(f"jobs {sorted(both)} are both placed and pending")
    # Each queued job exactly once: the counts add up and nothing is foreign (C-level).
    if len(placed) + len(pending) != len(jobs) or not pending.keys() <= jobs.keys():
        missing = jobs.keys() - set(placed) - pending.keys()
        if missing:
            out.append(f"jobs {sorted(missing)} are neither placed nor pending")
        extra = (set(placed) | pending.keys()) - jobs.keys()
        if extra:
            out.append(f"jobs {sorted(extra)} are not in the queue")
    elif any(j not in jobs for j in placed):
        out.append(f"jobs {sorted(j for j in placed if j not in jobs)} are not in the queue")
    used: set[tuple[int, int]] = set()
    for p in decision.placements:
        job = jobs.get(p.job_id)
        if job is None:
            continue
        if len(p.workers) != job.num_workers:
            out.append(f"job {job.job_id}: {len(p.workers)} workers placed, not {job.num_workers}")
        levels = allowed_levels(job, config) if config is not None else None
        for w in p.workers:
            node = by_node.get(w.node_id)
            if node is None:
                out.append(f"job {job.job_id}: node {w.node_id} is not schedulable")
                continue
            if node.site_key != (p.provider_id, p.site_id):
                out.append(f"job {job.job_id}: node {node.name} is not in the placement's site")
            if not node_matches(job, node.gpu_model, node.gpu_memory_bytes):
                out.append(f"job {job.job_id}: node {node.name} does not match its constraints")
            if not in_force(node, now_s):
                out.append(f"job {job.job_id}: node {node.name}'s agreement has ended")
            if levels is not None and node.level not in levels:
                out.append(f"job {job.job_id}: {node.level.value} capacity is not for its class")
            if len(w.gpu_ids) != job.gpus_per_worker:
                out.append(f"job {job.job_id}: a worker has {len(w.gpu_ids)} GPUs")
            free = set(node.free_gpu_ids)
            for gpu in w.gpu_ids:
                if gpu not in free:
                    out.append(f"job {job.job_id}: GPU {gpu} of node {node.name} is not free")
                if (w.node_id, gpu) in used:
                    out.append(f"job {job.job_id}: GPU {gpu} of node {node.name} used twice")
                used.add((w.node_id, gpu))
    stopped: set[int] = set()
    for pre in decision.preemptions:
        job = jobs.get(pre.job_id)
        if job is None or pre.job_id not in decision.pending:
            out.append(f"job {pre.job_id} preempts but is not a pending job of the queue")
            continue
        if pre.deadline_s < now_s:
            out.append(f"job {pre.job_id}: its victims' deadline is in the past")
        for aid in pre.victims:
            victim = allocs.get(aid)
            if victim is None:
                out.append(f"job {pre.job_id}: allocation {aid} is not running")
                continue
            if aid in stopped:
                out.append(f"allocation {aid} is preempted twice")
            stopped.add(aid)
            if victim.stopping_until_s is not None:
                out.append(f"job {pre.job_id}: allocation {aid} is already stopping")
            if not victim.preemptible or victim.priority >= job.priority:
                out.append(f"job {pre.job_id}: allocation {aid} may not be preempted by it")
            if victim.site_key != (pre.provider_id, pre.site_id):
                out.append(f"job {pre.job_id}: allocation {aid} is in another site")
    for job_id in decision.reservations:
        if job_id not in decision.pending:
            out.append(f"job {job_id} holds a reservation but is not pending")
    return out


def validate(
    decision: Decision,
    queue: Sequence[JobRequest],
    nodes: Sequence[NodeView],
    running: Sequence[RunningAllocation],
    *,
    now_s: int,
    config: PolicyConfig | None = None,
) -> None:
    """Raise :class:`InvalidDecision` listing every rule ``decision`` breaks."""
    found = problems(decision, queue, nodes, running, now_s=now_s, config=config)
    if found:
        raise InvalidDecision(found)
