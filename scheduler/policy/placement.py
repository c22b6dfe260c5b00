"""Andromeda's placement policy: one pure function from (queue, nodes, running) to a Decision.

The same function runs in the live scheduler loop, the trace-replay simulator and the
benchmarks, so it is PURE: no database, no Ray, no clock (``now_s`` is passed in), no
randomness, and it never mutates its inputs. The same input always yields the same output.
Its knobs are data (:mod:`scheduler.policy.config`); each rule has its own module:

- ``constraints``: GPU model and memory, commitment steering per priority class;
- ``capacity``: the index of free and held GPUs, best-fit plans, the release timeline;
- ``preemption``: which running work a job may stop, chosen by the work it would lose;
- ``backfill``: reservations, and which lower jobs may use the GPUs they count on;
- ``reasons``: what every waiting job is told.

Rules, in the order they apply to each job of the queue:

1. Queue order is priority descending, then ``seq`` ascending (FIFO within a priority, so
   the longest-waiting job of a class goes first); see :func:`queue_key`.
2. A gang is all-or-nothing and lies inside ONE site of one provider. Each worker needs
   ``gpus_per_worker`` GPUs on a single node; several workers may share a node. A node
   must match the job's GPU model and memory and be on a commitment level the job's class
   may use (steering), and its agreement must be in force.
3. On free GPUs, the best placement wins: the job's most preferred commitment levels
   first; then, among equally good levels, the provider furthest behind its commitment
   (fairness); then the tightest fit (fewest GPUs left free on the nodes used), then ids.
   GPUs placed earlier in a cycle are not free for later jobs of the same cycle.
4. A job that does not fit on free GPUs may preempt (``preemption``): it stops victims
   with a grace period and starts once they are gone; it is never placed on GPUs that are
   not free. A job whose victims are still stopping does not preempt again: it reserves.
5. Otherwise the first ``reservation_depth`` such jobs, and the first job of each
   priority that has waited longer than ``starving_after_s`` (aging: nothing waits
   forever within a class), get a reservation (``backfill``): large gangs no longer
   starve behind streams of small jobs, and their pending reason says when and where
   they start.
6. Every job left waiting gets a specific reason (``reasons``).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import add, attrgetter

from scheduler.policy import reasons
from scheduler.policy.backfill import earliest_start, reserve
from scheduler.policy.capacity import NEVER, Node, Pool, Prefs
from scheduler.policy.config import DEFAULT_CONFIG, PolicyConfig
from scheduler.policy.constraints import in_force, level_preference, node_matches
from scheduler.policy.preemption import Victims, best_choice, index_victims
from scheduler.policy.types import (
    Decision,
    JobRequest,
    NodeView,
    Placement,
    Preemption,
    ProviderState,
    RunningAllocation,
    WorkerPlacement,
)

logger = logging.getLogger(__name__)

_MatchKey = tuple[str | None, int | None]


def queue_key(job: JobRequest) -> tuple[int, int, int]:
    """The single ordering of the queue: priority descending, then seq, then job id."""
    return (-job.priority, job.seq, job.job_id)


@dataclass(slots=True)
class Cycle:
    """Mutable state of one call to :func:`schedule`; discarded when the call returns."""

    now_s: int
    config: PolicyConfig
    pools: dict[tuple[int, int], Pool]
    pool_order: list[Pool]
    classes: list[tuple[str, int]]
    victims: Victims
    fairness: dict[int, int]  # provider -> delivered/target (x 1e6); lower: further behind
    targets: dict[int, tuple[int, int]]  # provider -> (target, delivered) GPU-seconds
    match_cache: dict[_MatchKey, frozenset[int]] = field(default_factory=dict)
    prefs_cache: dict[tuple[int, bool, bool], Prefs] = field(default_factory=dict)
    free_fail: dict[tuple[frozenset[int], int, Prefs], int] = field(default_factory=dict)
    preempt_fail: dict[tuple[frozenset[int], int, Prefs, int], int] = field(default_factory=dict)
    # Grows with every action (placement, preemption, reservation): caches keyed by it.
    version: int = 0
    preemptions: int = 0
    reservations: int = 0
    borrow_fail: dict[tuple[object, ...], int] = field(default_factory=dict)
    static_reasons: dict[tuple[object, ...], str | None] = field(default_factory=dict)
    earliest_cache: dict[tuple[object, ...], tuple[int, tuple[int, Pool] | None]] = field(
        default_factory=dict
    )

    def matching(self, job: JobRequest) -> frozenset[int]:
        key = (job.gpu_model, job.min_gpu_memory_bytes)
        found = self.match_cache.get(key)
        if found is None:
            found = frozenset(
                i for i, (model, mem) in enumerate(self.classes) if node_matches(job, model, mem)
            )
            self.match_cache[key] = found
        return found

    def prefs(self, job: JobRequest) -> Prefs:
        key = (job.priority, job.preemptible, job.checkpointing)
        found = self.prefs_cache.get(key)
        if found is None:
            found = self.prefs_cache[key] = level_preference(job, self.config)
        return found

    def credit(self, provider_id: int, gpus: int) -> None:
        """Count a placement towards its provider's commitment for the rest of the cycle."""
        if provider_id in self.targets:
            target, delivered = self.targets[provider_id]
            delivered += gpus * self.config.fairness_horizon_s
            self.targets[provider_id] = (target, delivered)
            self.fairness[provider_id] = _fulfilment(target, delivered)


def _fulfilment(target: int, delivered: int) -> int:
    return NEVER if target <= 0 else delivered * 1_000_000 // target


def build_cycle(
    nodes: Sequence[NodeView],
    running: Sequence[RunningAllocation],
    providers: Sequence[ProviderState],
    config: PolicyConfig,
    now_s: int,
) -> Cycle:
    class_index: dict[tuple[str, int], int] = {}
    pools: dict[tuple[int, int], Pool] = {}
    for view in sorted(nodes, key=lambda n: n.node_id):
        if not in_force(view, now_s):
            continue
        cls = class_index.setdefault((view.gpu_model, view.gpu_memory_bytes), len(class_index))
        pool = pools.get(view.site_key)
        if pool is None:
            pool = pools[view.site_key] = Pool(view.provider_id, view.site_id, view.site_name)
        pool.add(Node(view, cls, view.level.rank, sorted(view.free_gpu_ids)))
    for alloc in running:
        pool = pools.get(alloc.site_key)
        if pool is None:
            continue
        if alloc.stopping_until_s is not None:
            end = max(alloc.stopping_until_s, now_s)
        elif alloc.expected_end_s is not None:
            end = max(alloc.expected_end_s, now_s + 1)
        else:
            end = config.expected_end(alloc.since_s, None, now_s)
        per_node: dict[int, int] = {}
        for node_id, _gpu in alloc.gpus:
            if node_id in pool.nodes:
                per_node[node_id] = per_node.get(node_id, 0) + 1
        for node_id, count in per_node.items():
            pool.releases.append((end, node_id, count, alloc.allocation_id))
    for pool in pools.values():
        pool.releases.sort()
    targets: dict[int, tuple[int, int]] = {}
    fairness: dict[int, int] = {}
    if config.fairness:
        for p in providers:
            targets[p.provider_id] = (p.target_gpu_s, p.delivered_gpu_s)
            fairness[p.provider_id] = _fulfilment(p.target_gpu_s, p.delivered_gpu_s)
    return Cycle(
        now_s=now_s,
        config=config,
        pools=pools,
        pool_order=[pools[p] for p in sorted(pools)],
        classes=list(class_index),
        victims=index_victims(running, pools, now_s, config),
        fairness=fairness,
        targets=targets,
    )


def _earliest(
    cycle: Cycle, job: JobRequest, classes: frozenset[int], prefs: Prefs
) -> tuple[int, Pool] | None:
    """``backfill.earliest_start``, remembered until the pools change."""
    key = (classes, job.gpus_per_worker, job.num_workers, prefs)
    cached = cycle.earliest_cache.get(key)
    if cached is not None and cached[0] == cycle.version:
        return cached[1]
    found = earliest_start(cycle.pool_order, job, classes, prefs, cycle.now_s, cycle.fairness)
    cycle.earliest_cache[key] = (cycle.version, found)
    return found


def _expected_end(cycle: Cycle, job: JobRequest) -> int:
    runtime = job.max_runtime_s if job.max_runtime_s is not None else cycle.config.default_runtime_s
    return cycle.now_s + runtime


def _workers(
    pool: Pool, plan: list[tuple[int, int]], gpus: int, extra: dict[int, list[int]] | None = None
) -> tuple[WorkerPlacement, ...]:
    """Commit a plan: take the GPUs from the pool and number the workers in plan order."""
    out: list[WorkerPlacement] = []
    for node_id, k in plan:
        ids = pool.take(node_id, k * gpus, (extra or {}).get(node_id))
        for i in range(k):
            out.append(WorkerPlacement(len(out), node_id, tuple(ids[i * gpus : (i + 1) * gpus])))
    return tuple(out)


def place_free(
    cycle: Cycle, job: JobRequest, classes: frozenset[int], prefs: Prefs
) -> Placement | None:
    """The best placement of ``job`` on free GPUs (rule 3), or None; commits it."""
    n, g = job.num_workers, job.gpus_per_worker
    fail_key = (classes, g, prefs)
    if cycle.free_fail.get(fail_key, n + 1) > n:
        best: tuple[tuple[int, ...], Pool, list[tuple[int, int]]] | None = None
        for pool in cycle.pool_order:
            if pool.free_capacity(classes, g, prefs)[0] < n:
                continue
            plan = pool.plan(classes, g, n, prefs)
            if plan is None:  # cannot happen: capacity says it fits
                continue
            worst, weighted, left = pool.score(plan, g, prefs)
            key = (
                worst,
                weighted,
                cycle.fairness.get(pool.provider_id, 0),
                left,
                pool.provider_id,
                pool.site_id,
            )
            if best is None or key < best[0]:
                best = (key, pool, plan)
        if best is not None:
            _, pool, plan = best
            return Placement(job.job_id, pool.provider_id, _workers(pool, plan, g), pool.site_id)
        cycle.free_fail[fail_key] = n
    return _borrow(cycle, job, classes, prefs)


def _expect_release(cycle: Cycle, job: JobRequest, placement: Placement) -> None:
    """A gang placed this cycle releases its GPUs at its expected end, like running work."""
    pool = cycle.pools[(placement.provider_id, placement.site_id)]
    end = _expected_end(cycle, job)
    for w in placement.workers:
        bisect.insort(pool.releases, (end, w.node_id, len(w.gpu_ids), -job.job_id))
    pool.version += 1


def _borrow(
    cycle: Cycle, job: JobRequest, classes: frozenset[int], prefs: Prefs
) -> Placement | None:
    """Backfill onto held GPUs: only for a job expected to end before they are needed."""
    holds = cycle.reservations + cycle.preemptions  # each adds holds; borrowing only uses them
    if not holds:
        return None
    n, g = job.num_workers, job.gpus_per_worker
    end = _expected_end(cycle, job)
    fail_key = (classes, g, prefs, end, holds)
    if cycle.borrow_fail.get(fail_key, n + 1) <= n:
        return None
    best: tuple[tuple[int, ...], Pool, list[tuple[int, int]], dict[int, int]] | None = None
    for pool in cycle.pool_order:
        if not pool.holders:
            continue
        overrides = pool.borrowable(classes, prefs, end)
        if not overrides:
            continue
        plan = pool.plan(classes, g, n, prefs, overrides)
        if plan is None:
            continue
        worst, weighted, left = pool.score(plan, g, prefs, overrides)
        key = (
            worst,
            weighted,
            cycle.fairness.get(pool.provider_id, 0),
            left,
            pool.provider_id,
            pool.site_id,
        )
        if best is None or key < best[0]:
            best = (key, pool, plan, overrides)
    if best is None:
        cycle.borrow_fail[fail_key] = n
        return None
    _, pool, plan, overrides = best
    extra = {nid: pool.nodes[nid].held_until(end) for nid in overrides}
    return Placement(job.job_id, pool.provider_id, _workers(pool, plan, g, extra), pool.site_id)


def _why_no_preemption(cycle: Cycle, job: JobRequest) -> str:
    v = cycle.victims
    lower_p = bisect.bisect_left(v.lower_preemptible, job.priority)
    lower_f = bisect.bisect_left(v.lower_fixed, job.priority)
    young = bisect.bisect_left(v.too_young, job.priority)
    if not cycle.config.preemption:
        return "preemption is off"
    if lower_p == 0 and lower_f == 0 and young == 0:
        return "no running work has lower priority"
    if lower_p == 0 and young:
        minutes = cycle.config.min_runtime_s // 60
        return f"lower-priority work has run less than the minimum runtime ({minutes} min)"
    if lower_p == 0:
        return "lower-priority work is not preemptible"
    return "preempting all lower-priority preemptible work would not make room in one site"


_NOT_WORTH_SAYING = ("no running work has lower priority", "preemption is off")


def _try_preempt(
    cycle: Cycle, job: JobRequest, classes: frozenset[int], prefs: Prefs
) -> Preemption | str | None:
    """A preemption for ``job`` (rule 4), a reason it was refused on cost, or None."""
    config = cycle.config
    if not config.preemption or not cycle.victims.lower_preemptible:
        return None
    if cycle.victims.lower_preemptible[0] >= job.priority:
        return None
    if cycle.preemptions >= config.max_preemptions_per_cycle:
        return "this cycle's preemption limit is reached"
    n = job.num_workers
    fail_key = (classes, job.gpus_per_worker, prefs, job.priority)
    if cycle.preempt_fail.get(fail_key, n + 1) <= n:
        return None
    choice = best_choice(
        cycle.victims,
        cycle.pool_order,
        job,
        classes,
        prefs,
        cycle.fairness,
        by_loss=config.victim_order == "loss",
    )
    if choice is None:
        cycle.preempt_fail[fail_key] = n
        return None
    horizon = config.default_runtime_s
    if config.preempt_gain_factor:
        found = _earliest(cycle, job, classes, prefs)
        wait = horizon if found is None else min(horizon, found[0] - cycle.now_s)
        if wait <= config.preempt_grace_s:
            return None  # it starts about as soon without stopping anyone: reserve instead
    else:
        wait = horizon  # no cost rule: preempt whenever it makes room
    gain = job.num_gpus * wait
    if gain < config.preempt_gain_factor * choice.loss_gpu_s:
        return (
            f"preempting would lose {reasons.gpu_hours(choice.loss_gpu_s)} GPU-h of work for "
            f"{reasons.gpu_hours(gain)} GPU-h of waiting spared "
            f"(needs {config.preempt_gain_factor}x)"
        )
    pool, g = choice.pool, job.gpus_per_worker
    deadline = cycle.now_s + config.preempt_grace_s
    victim_gpus: dict[int, int] = {}
    for victim in choice.victims:
        cycle.victims.taken.add(victim.alloc.allocation_id)
        pool.drop_release(victim.alloc.allocation_id)
        for node_id, ids in victim.by_node.items():
            victim_gpus[node_id] = victim_gpus.get(node_id, 0) + len(ids)
    for node_id, k in choice.plan:  # the free GPUs the job will use wait for it
        from_free = k * g - victim_gpus.get(node_id, 0)
        if from_free > 0:
            pool.hold(node_id, from_free, deadline)
    cycle.preemptions += 1
    return Preemption(
        job_id=job.job_id,
        provider_id=pool.provider_id,
        site_id=pool.site_id,
        victims=tuple(sorted(v.alloc.allocation_id for v in choice.victims)),
        deadline_s=deadline,
        lost_gpu_s=choice.loss_gpu_s,
        gain_gpu_s=gain,
    )


_KIND2 = attrgetter("kind2")
_JOB_ID = attrgetter("job_id")
_SUBMITTED = attrgetter("submitted_s")
_ORDER = attrgetter("order")
# After this many jobs in a row that changed nothing, the rest of the queue is decided per
# kind of job (see ``_decide_tail``): a long queue of similar jobs costs C-level passes,
# not a Python iteration per job.
BULK_AFTER = 64


def ordered(queue: Sequence[JobRequest]) -> list[JobRequest]:
    """The queue in :func:`queue_key` order (``JobRequest.order`` packs that key in an int)."""
    return sorted(queue, key=_ORDER)


def schedule(
    queue: Sequence[JobRequest],
    nodes: Sequence[NodeView],
    running: Sequence[RunningAllocation],
    *,
    now_s: int,
    providers: Sequence[ProviderState] = (),
    config: PolicyConfig = DEFAULT_CONFIG,
) -> Decision:
    """Decide which queued gangs start now, where, what they preempt, and when the others
    are expected to start. See the module docstring for the rules."""
    cycle = build_cycle(nodes, running, providers, config, now_s)
    decision = Decision()
    inflight: dict[int, list[RunningAllocation]] = {}
    for alloc in running:
        if alloc.stopping_until_s is not None and alloc.stopping_for_job is not None:
            inflight.setdefault(alloc.stopping_for_job, []).append(alloc)
    victim_jobs = {r.allocation_id: r.job_id for r in running}
    # kind2 + starving -> (cycle.version, reason) of a job that came out with no action:
    # while nothing changes (every action bumps the version), a job of the same kind gets
    # the same reason, so a long queue of similar jobs costs a lookup each.
    memo: dict[int, tuple[int, str]] = {}
    starving_heads: set[int] = set()  # priority classes whose starving head reserved
    starve_before = now_s - config.starving_after_s

    def decide(job: JobRequest, starving: bool) -> None:
        """Rules 2-6 for one job: place it, or record why it waits (and what it does)."""
        key = job.kind2 + starving
        if job.job_id not in inflight:
            hit = memo.get(key)
            if hit is not None and hit[0] == cycle.version:
                decision.pending[job.job_id] = hit[1]
                return
        if job.num_workers < 1 or job.gpus_per_worker < 1:
            decision.pending[job.job_id] = (
                f"invalid gang shape: {job.num_workers} workers x {job.gpus_per_worker} GPUs"
            )
            return
        classes = cycle.matching(job)
        prefs = cycle.prefs(job)
        placement = None
        if classes and any(p is not None for p in prefs):
            placement = place_free(cycle, job, classes, prefs)
        if placement is not None:
            cycle.version += 1
            cycle.credit(placement.provider_id, job.num_gpus)
            _expect_release(cycle, job, placement)
            decision.placements.append(placement)
            return
        static_key = (classes, job.gpus_per_worker, job.num_workers, prefs)
        if static_key not in cycle.static_reasons:
            cycle.static_reasons[static_key] = reasons.not_placeable(
                job, classes, prefs, cycle.pool_order, config
            )
        impossible = cycle.static_reasons[static_key]
        if impossible is not None:
            decision.pending[job.job_id] = impossible
            return
        version = cycle.version
        reason = _wait(cycle, decision, job, classes, prefs, inflight, victim_jobs, starving)
        decision.pending[job.job_id] = reason
        if cycle.version == version:
            memo[key] = (version, reason)
        elif starving and job.job_id in decision.reservations:
            starving_heads.add(job.priority)

    jobs = ordered(queue)
    i, quiet = 0, 0
    while i < len(jobs):
        if quiet >= BULK_AFTER:
            resume = _decide_tail(
                jobs, i, decide, cycle, decision, inflight, starve_before, starving_heads
            )
            if resume is None:  # the tail needs its jobs one by one
                quiet = -len(jobs)
            else:
                i, quiet = resume, 0
            continue
        job = jobs[i]
        i += 1
        sub = job.submitted_s
        starving = sub is not None and sub <= starve_before and job.priority not in starving_heads
        version = cycle.version
        decide(job, starving)
        quiet = quiet + 1 if cycle.version == version else 0
    return decision


def _decide_tail(
    jobs: list[JobRequest],
    start: int,
    decide: Callable[[JobRequest, bool], None],
    cycle: Cycle,
    decision: Decision,
    inflight: dict[int, list[RunningAllocation]],
    starve_before: int,
    starving_heads: set[int],
) -> int | None:
    """Decide ``jobs[start:]`` by kind, exactly as one by one would: the first job of each
    kind (its shape, constraints, priority, and whether it has waited long enough to be
    starving) is decided, in queue order; while none of them acts, every job of a kind gets
    its first job's reason. When one acts, the jobs before it are decided and the index
    after it is returned (one by one resumes there). None when the tail holds a job this
    cannot decide by kind (one whose victims are stopping, or with no submit time)."""
    tail = jobs[start:]
    if inflight and not inflight.keys().isdisjoint(map(_JOB_ID, tail)):
        return None
    submitted = list(map(_SUBMITTED, tail))
    if None in submitted:
        return None
    keys = list(map(add, map(_KIND2, tail), map(starve_before.__ge__, submitted)))
    firsts = dict(zip(reversed(keys), range(len(tail) - 1, -1, -1), strict=True))
    reason_of: dict[int, str] = {}
    version = cycle.version
    for idx in sorted(firsts.values()):
        job = tail[idx]
        decide(job, bool(keys[idx] & 1) and job.priority not in starving_heads)
        if cycle.version != version:
            decision.pending.update(
                zip(map(_JOB_ID, tail[:idx]), map(reason_of.__getitem__, keys[:idx]), strict=True)
            )
            return start + idx + 1
        reason_of[keys[idx]] = decision.pending[job.job_id]
    decision.pending.update(zip(map(_JOB_ID, tail), map(reason_of.__getitem__, keys), strict=True))
    return len(jobs)


def _wait(
    cycle: Cycle,
    decision: Decision,
    job: JobRequest,
    classes: frozenset[int],
    prefs: Prefs,
    inflight: dict[int, list[RunningAllocation]],
    victim_jobs: dict[int, int],
    starving: bool,
) -> str:
    """Rules 4-6 for a job that does not fit now: preempt, reserve, or say why it waits."""
    config = cycle.config
    stopping = inflight.get(job.job_id)
    if stopping:
        text = reasons.stopping_for(
            sorted({a.job_id for a in stopping}), max(a.stopping_until_s or 0 for a in stopping)
        )
        return _reserve(cycle, decision, job, classes, prefs, text) or text
    may_reserve = config.backfill and (cycle.reservations < config.reservation_depth or starving)
    refused = ""
    outcome = _try_preempt(cycle, job, classes, prefs)
    if isinstance(outcome, Preemption):
        cycle.version += 1
        decision.preemptions.append(outcome)
        site = cycle.pools[(outcome.provider_id, outcome.site_id)].site_name
        jobs = sorted({victim_jobs[a] for a in outcome.victims})
        return reasons.preempting(outcome, jobs, site)
    if isinstance(outcome, str):
        refused = outcome
    why = refused or _why_no_preemption(cycle, job)
    if may_reserve:
        held = _reserve(cycle, decision, job, classes, prefs, "")
        if held is not None:
            return f"{held}; {why}" if why not in _NOT_WORTH_SAYING else held
    held_for = ""
    if cycle.reservations or cycle.preemptions:
        fits_held = any(
            pool.plan(
                classes,
                job.gpus_per_worker,
                job.num_workers,
                prefs,
                pool.borrowable(classes, prefs, 0),
            )
            for pool in cycle.pool_order
            if pool.holders
        )
        if fits_held:
            held_for = (
                "the GPUs that would fit it are held for higher-priority jobs that "
                "start before it would end"
            )
    return reasons.waiting(job, classes, prefs, cycle.pool_order, why, held_for)


def _reserve(
    cycle: Cycle,
    decision: Decision,
    job: JobRequest,
    classes: frozenset[int],
    prefs: Prefs,
    waiting_for: str,
) -> str | None:
    found = _earliest(cycle, job, classes, prefs)
    if found is None:
        return None
    start, pool = found
    runtime = job.max_runtime_s if job.max_runtime_s is not None else cycle.config.default_runtime_s
    res = reserve(
        pool,
        job,
        classes,
        prefs,
        start,
        hold=start - cycle.now_s <= cycle.config.backfill_window_s,
        end_s=start + runtime,
    )
    if res is None:
        return None
    cycle.version += 1
    cycle.reservations += 1
    decision.reservations[job.job_id] = res
    return reasons.reservation(res, cycle.now_s, waiting_for=waiting_for)
