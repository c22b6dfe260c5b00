"""Andromeda's placement policy: one pure function from (queue, nodes, running) to a Decision.

The same function runs in the live scheduler loop, the trace-replay simulator and the
benchmarks, so it is PURE: no database, no Ray, no clock (``now_s`` is passed in), no
randomness, and it never mutates its inputs. The same input always yields the same output.

Rules, in the order they apply:

1. Queue order is priority descending, then ``seq`` ascending (FIFO within a priority); see
   :func:`queue_key`, the one comparator.
2. A gang is all-or-nothing and lies inside ONE provider. Each worker needs
   ``gpus_per_worker`` GPUs on a single node; several workers may share a node. A node must
   match the job's GPU model (:func:`scheduler.domain.gpu_models.model_matches`) and memory.
   Because workers are independent within a provider, a gang of ``n`` workers of ``g`` GPUs
   fits a provider exactly when ``sum(free // g) >= n`` over its matching nodes.
3. Among providers that can host the gang, prefer the placement on the strongest commitment
   levels (reserved, then committed, then spot): promised capacity is used first and spot,
   which the provider can reclaim at any time, last. Within a level, pack: a node that is
   left with fewer free GPUs is preferred (best fit), ties broken by node id; within a node
   the lowest GPU ids are used.
4. GPUs placed earlier in a cycle are not free for later jobs of the same cycle.
5. A job that does not fit on free GPUs may preempt running allocations that are
   preemptible and of strictly lower priority, all within one provider. Victims are taken
   lowest priority first, then most recently started first, until the gang fits; victims
   that turn out unnecessary are then dropped again (newest-added first), as Kueue does.
   Among providers the one needing the fewest preempted GPUs wins, then the strongest level.
   A victim's GPUs serve only the job that preempted it in this cycle; placements made in
   this cycle are never victims.
6. A job that cannot be placed gets a specific reason.

Best-effort FIFO and its starvation risk: a job that does not fit does not block later jobs
from using what is left. This keeps GPUs busy, but a large gang can starve behind a stream
of small jobs that keep taking the GPUs it is waiting for (it will only get in by
preemption, and only over lower-priority preemptible work). Reservations / backfill with a
reserved shadow start time are the planned remedy and are not implemented here.

Cost: nodes are bucketed per provider by (node class, level, free count), where a node class
is a distinct (GPU model, memory) pair, so placing one gang costs about
``providers x buckets x workers`` rather than ``nodes``. Results that only get worse within a
cycle (a gang shape that did not fit) are cached so that a long queue of similar jobs does
not rescan the cluster or the victim list.
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from scheduler.domain.gpu_models import model_matches
from scheduler.policy.types import (
    Decision,
    JobRequest,
    NodeView,
    Placement,
    RunningAllocation,
    WorkerPlacement,
)

logger = logging.getLogger(__name__)

_MatchKey = tuple[str | None, int | None]
_BucketKey = tuple[int, int, int]  # (node class, level rank, free GPUs)
_Plan = list[tuple[int, int]]  # (node_id, workers on it)


def queue_key(job: JobRequest) -> tuple[int, int, int]:
    """The single ordering of the queue: priority descending, then seq, then job id."""
    return (-job.priority, job.seq, job.job_id)


def node_matches(job: JobRequest, gpu_model: str, gpu_memory_bytes: int) -> bool:
    """True when a node with this GPU model and per-GPU memory satisfies the job's constraints."""
    if job.gpu_model is not None and not model_matches(job.gpu_model, gpu_model):
        return False
    return job.min_gpu_memory_bytes is None or gpu_memory_bytes >= job.min_gpu_memory_bytes


def describe_constraint(job: JobRequest) -> str:
    """E.g. ``"H200 GPUs with >= 141 GB"``; used in pending reasons."""
    text = f"{job.gpu_model} GPUs" if job.gpu_model else "GPUs"
    if job.min_gpu_memory_bytes is not None:
        text += f" with >= {_gb(job.min_gpu_memory_bytes)} GB"
    return text


def _gb(num_bytes: int) -> str:
    value = num_bytes / 10**9
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


@dataclass(slots=True)
class _Node:
    view: NodeView
    cls: int
    rank: int
    free: list[int]  # sorted ascending; shrinks as the cycle places gangs


@dataclass(slots=True)
class _Pool:
    """The nodes of one provider, indexed so that a best-fit node is found without a scan.

    Invariant: a node with ``f > 0`` free GPUs appears in exactly one bucket,
    ``(cls, rank, f)``, whose node-id list is sorted; nodes with no free GPU are in none.
    """

    provider_id: int
    site_id: int
    nodes: dict[int, _Node] = field(default_factory=dict)
    buckets: dict[_BucketKey, list[int]] = field(default_factory=dict)
    # node class -> total GPUs per node -> number of nodes (for static capacity).
    totals: dict[int, dict[int, int]] = field(default_factory=dict)

    def add(self, node: _Node) -> None:
        self.nodes[node.view.node_id] = node
        per_cls = self.totals.setdefault(node.cls, {})
        per_cls[node.view.total_gpus] = per_cls.get(node.view.total_gpus, 0) + 1
        self._insert(node)

    def _insert(self, node: _Node) -> None:
        if node.free:
            ids = self.buckets.setdefault((node.cls, node.rank, len(node.free)), [])
            bisect.insort(ids, node.view.node_id)

    def _remove(self, node: _Node) -> None:
        if not node.free:
            return
        key = (node.cls, node.rank, len(node.free))
        ids = self.buckets[key]
        del ids[bisect.bisect_left(ids, node.view.node_id)]
        if not ids:
            del self.buckets[key]

    def take(self, node_id: int, count: int, extra: Sequence[int] = ()) -> list[int]:
        """Remove and return the ``count`` lowest GPU ids among free + ``extra`` (victim) GPUs.

        Victim GPUs that are not used do not become free for the rest of the cycle.
        """
        node = self.nodes[node_id]
        avail = sorted([*node.free, *extra]) if extra else node.free
        chosen = avail[:count]
        used = set(chosen)
        self._remove(node)
        node.free = [gpu for gpu in node.free if gpu not in used]
        self._insert(node)
        return chosen

    def free_capacity(self, classes: frozenset[int], gpus: int) -> tuple[int, int]:
        """(workers of ``gpus`` GPUs that fit on free GPUs, free GPUs) on matching nodes."""
        workers = 0
        free = 0
        for (cls, _rank, f), ids in self.buckets.items():
            if cls in classes:
                workers += len(ids) * (f // gpus)
                free += len(ids) * f
        return workers, free

    def static_capacity(self, classes: frozenset[int], gpus: int) -> tuple[int, int, int]:
        """(workers that fit on an empty provider, matching GPUs, largest matching node)."""
        workers = 0
        total = 0
        largest = 0
        for cls in classes:
            for size, count in self.totals.get(cls, {}).items():
                workers += count * (size // gpus)
                total += count * size
                largest = max(largest, size)
        return workers, total, largest

    def plan(
        self,
        classes: frozenset[int],
        gpus: int,
        workers: int,
        overrides: dict[int, int] | None = None,
    ) -> list[tuple[int, int]] | None:
        """Greedy best-fit plan: a list of (node_id, workers on it), or None if it does not fit.

        ``overrides`` gives the free-GPU count of nodes whose count is augmented by victim
        GPUs (preemption); such nodes are ignored in the buckets. Each step picks the node
        minimising (level rank, free GPUs left after placing as many workers as it can take,
        node id) and fills it; a filled node can take no further worker, so each node is
        picked at most once and the plan has at most ``workers`` steps.
        """
        picked: dict[int, int] = {}
        remaining = workers
        while remaining:
            best: tuple[int, int, int] | None = None
            best_k = 0
            for (cls, rank, f), ids in self.buckets.items():
                if f < gpus or cls not in classes:
                    continue
                k = min(f // gpus, remaining)
                key_head = (rank, f - k * gpus)
                if best is not None and key_head > best[:2]:
                    continue
                for node_id in ids:
                    if node_id not in picked and (overrides is None or node_id not in overrides):
                        break
                else:
                    continue
                key = (*key_head, node_id)
                if best is None or key < best:
                    best, best_k = key, k
            if overrides:
                for node_id, f in overrides.items():
                    if f < gpus or node_id in picked:
                        continue
                    k = min(f // gpus, remaining)
                    key = (self.nodes[node_id].rank, f - k * gpus, node_id)
                    if best is None or key < best:
                        best, best_k = key, k
            if best is None:
                return None
            picked[best[2]] = best_k
            remaining -= best_k
        return list(picked.items())

    def score(
        self, plan: list[tuple[int, int]], gpus: int, overrides: dict[int, int] | None = None
    ) -> tuple[int, int, int]:
        """(weakest level, GPU-weighted level sum, GPUs left free on used nodes): lower wins."""
        worst = 0
        weighted = 0
        left = 0
        for node_id, k in plan:
            node = self.nodes[node_id]
            free = overrides.get(node_id, len(node.free)) if overrides else len(node.free)
            worst = max(worst, node.rank)
            weighted += node.rank * k * gpus
            left += free - k * gpus
        return worst, weighted, left


@dataclass(slots=True)
class _Victim:
    alloc: RunningAllocation
    by_node: dict[int, list[int]]  # node_id -> GPU ids, only on nodes that were passed in


@dataclass(slots=True)
class _Cycle:
    """Mutable state of one call to :func:`schedule`; discarded when the call returns."""

    pools: dict[tuple[int, int], _Pool]
    pool_order: list[_Pool]
    classes: list[tuple[str, int]]
    victims: dict[tuple[int, int], list[_Victim]]  # site -> preemptible, in victim order
    taken: set[int] = field(default_factory=set)  # allocation ids already preempted
    lower_preemptible: list[int] = field(default_factory=list)  # sorted priorities
    lower_fixed: list[int] = field(default_factory=list)  # sorted priorities
    match_cache: dict[_MatchKey, frozenset[int]] = field(default_factory=dict)
    free_fail: dict[tuple[frozenset[int], int], int] = field(default_factory=dict)
    preempt_fail: dict[tuple[frozenset[int], int], int] = field(default_factory=dict)
    # Reasons depend on the free GPUs, which change only when something is placed.
    version: int = 0
    reason_cache: dict[tuple[object, ...], tuple[int, str]] = field(default_factory=dict)

    def matching(self, job: JobRequest) -> frozenset[int]:
        key = (job.gpu_model, job.min_gpu_memory_bytes)
        found = self.match_cache.get(key)
        if found is None:
            found = frozenset(
                i for i, (model, mem) in enumerate(self.classes) if node_matches(job, model, mem)
            )
            self.match_cache[key] = found
        return found


def _build(nodes: Sequence[NodeView], running: Sequence[RunningAllocation]) -> _Cycle:
    class_index: dict[tuple[str, int], int] = {}
    pools: dict[tuple[int, int], _Pool] = {}
    for view in sorted(nodes, key=lambda n: n.node_id):
        cls = class_index.setdefault((view.gpu_model, view.gpu_memory_bytes), len(class_index))
        pool = pools.get(view.site_key)
        if pool is None:
            pool = pools[view.site_key] = _Pool(view.provider_id, view.site_id)
        pool.add(_Node(view, cls, view.level.rank, sorted(view.free_gpu_ids)))
    victims: dict[tuple[int, int], list[_Victim]] = defaultdict(list)
    lower_preemptible: list[int] = []
    lower_fixed: list[int] = []
    for alloc in running:
        if not alloc.preemptible:
            lower_fixed.append(alloc.priority)
            continue
        lower_preemptible.append(alloc.priority)
        pool = pools.get(alloc.site_key)
        by_node: dict[int, list[int]] = {}
        for node_id, gpu_id in alloc.gpus:
            if pool is not None and node_id in pool.nodes:
                by_node.setdefault(node_id, []).append(gpu_id)
        victims[alloc.site_key].append(_Victim(alloc, by_node))
    for entries in victims.values():
        entries.sort(
            key=lambda v: (v.alloc.priority, -v.alloc.started_at_s, -v.alloc.allocation_id)
        )
    return _Cycle(
        pools=pools,
        pool_order=[pools[p] for p in sorted(pools)],
        classes=list(class_index),
        victims=dict(victims),
        lower_preemptible=sorted(lower_preemptible),
        lower_fixed=sorted(lower_fixed),
    )


def _workers(
    pool: _Pool, plan: list[tuple[int, int]], gpus: int, extra: dict[int, list[int]] | None = None
) -> tuple[WorkerPlacement, ...]:
    """Commit a plan: take the GPUs from the pool and number the workers in plan order."""
    out: list[WorkerPlacement] = []
    for node_id, k in plan:
        ids = pool.take(node_id, k * gpus, (extra or {}).get(node_id, ()))
        for i in range(k):
            out.append(WorkerPlacement(len(out), node_id, tuple(ids[i * gpus : (i + 1) * gpus])))
    return tuple(out)


def _place_free(cycle: _Cycle, job: JobRequest, classes: frozenset[int]) -> Placement | None:
    n, g = job.num_workers, job.gpus_per_worker
    if cycle.free_fail.get((classes, g), n + 1) <= n:
        return None
    best: tuple[tuple[int, ...], _Pool, list[tuple[int, int]]] | None = None
    for pool in cycle.pool_order:
        if pool.free_capacity(classes, g)[0] < n:
            continue
        plan = pool.plan(classes, g, n)
        if plan is None:  # cannot happen: capacity says it fits
            continue
        key = (*pool.score(plan, g), pool.provider_id, pool.site_id)
        if best is None or key < best[0]:
            best = (key, pool, plan)
    if best is None:
        cycle.free_fail[(classes, g)] = n
        return None
    _, pool, plan = best
    return Placement(job.job_id, pool.provider_id, _workers(pool, plan, g), (), pool.site_id)


def _victims_for(
    cycle: _Cycle, pool: _Pool, job: JobRequest, classes: frozenset[int]
) -> tuple[list[_Victim], dict[int, int]] | None:
    """The victim set for ``job`` in ``pool`` and the augmented free counts, or None."""
    n, g = job.num_workers, job.gpus_per_worker
    cap = pool.free_capacity(classes, g)[0]
    aug: dict[int, int] = {}
    chosen: list[_Victim] = []

    def contrib(victim: _Victim) -> Iterable[tuple[int, int]]:
        for node_id, ids in victim.by_node.items():
            if pool.nodes[node_id].cls in classes:
                yield node_id, len(ids)

    for victim in cycle.victims.get((pool.provider_id, pool.site_id), ()):
        if victim.alloc.priority >= job.priority:
            break  # sorted by priority: nothing further is eligible
        if victim.alloc.allocation_id in cycle.taken:
            continue
        gains = list(contrib(victim))
        if not gains:
            continue  # its GPUs cannot host this job; preempting it would be pure loss
        chosen.append(victim)
        for node_id, count in gains:
            old = aug.get(node_id, len(pool.nodes[node_id].free))
            aug[node_id] = old + count
            cap += (old + count) // g - old // g
        if cap >= n:
            break
    if cap < n:
        return None
    # Drop victims that are not needed after all, newest-added (highest priority) first.
    for victim in reversed(chosen[:-1]):
        delta = 0
        for node_id, count in contrib(victim):
            cur = aug[node_id]
            delta += (cur - count) // g - cur // g
        if cap + delta >= n:
            chosen.remove(victim)
            cap += delta
            for node_id, count in contrib(victim):
                aug[node_id] -= count
    return chosen, aug


_PreemptChoice = tuple[tuple[int, ...], "_Pool", list[_Victim], dict[int, int], _Plan]


def _place_preempting(cycle: _Cycle, job: JobRequest, classes: frozenset[int]) -> Placement | None:
    n, g = job.num_workers, job.gpus_per_worker
    if cycle.preempt_fail.get((classes, g), n + 1) <= n:
        return None
    best: _PreemptChoice | None = None
    for pool in cycle.pool_order:
        if pool.static_capacity(classes, g)[0] < n:
            continue
        found = _victims_for(cycle, pool, job, classes)
        if found is None:
            continue
        chosen, aug = found
        plan = pool.plan(classes, g, n, aug)
        if plan is None:
            continue
        preempted = sum(len(v.alloc.gpus) for v in chosen)
        key = (preempted, *pool.score(plan, g, aug), pool.provider_id, pool.site_id)
        if best is None or key < best[0]:
            best = (key, pool, chosen, aug, plan)
    if best is None:
        cycle.preempt_fail[(classes, g)] = n
        return None
    _, pool, chosen, aug, plan = best
    extra: dict[int, list[int]] = {}
    for victim in chosen:
        cycle.taken.add(victim.alloc.allocation_id)
        for node_id, ids in victim.by_node.items():
            extra.setdefault(node_id, []).extend(ids)
    workers = _workers(pool, plan, g, extra)
    preempts = tuple(sorted(v.alloc.allocation_id for v in chosen))
    logger.debug("job %s preempts %s on provider %s", job.job_id, preempts, pool.provider_id)
    return Placement(job.job_id, pool.provider_id, workers, preempts, pool.site_id)


def _reason(cycle: _Cycle, job: JobRequest, classes: frozenset[int]) -> str:
    """Why ``job`` was not placed, from the most fundamental obstacle to the transient one."""
    n, g = job.num_workers, job.gpus_per_worker
    if not classes:  # classes come from the nodes passed in, so none match
        return f"no ready node has {describe_constraint(job)}"
    statics = [pool.static_capacity(classes, g) for pool in cycle.pool_order]
    largest_node = max(s[2] for s in statics)
    if largest_node < g:
        return (
            f"needs {g} GPUs per worker on one node; the largest ready node with "
            f"{describe_constraint(job)} has {largest_node}"
        )
    if max(s[0] for s in statics) < n:
        biggest = max(s[1] for s in statics)
        total = sum(s[1] for s in statics)
        text = (
            f"needs {n} workers x {g} GPUs in one provider; the largest provider has "
            f"{biggest} matching GPUs"
        )
        if sum(s[0] for s in statics) >= n:
            text += f" ({total} across all providers; a gang never spans providers)"
        return text
    frees = [pool.free_capacity(classes, g) for pool in cycle.pool_order]
    free_gpus = sum(f[1] for f in frees)
    want = f"{n * g} free GPUs" if n == 1 else f"{n} workers x {g} free GPUs in one provider"
    text = f"waiting for {want} ({free_gpus} free on matching nodes of any provider"
    if free_gpus >= n * g:
        text += f"; fragmented: the best provider fits {max(f[0] for f in frees)} of {n} workers"
    text += "); "
    lower_p = bisect.bisect_left(cycle.lower_preemptible, job.priority)
    lower_f = bisect.bisect_left(cycle.lower_fixed, job.priority)
    if lower_p == 0 and lower_f == 0:
        text += "no running work has lower priority"
    elif lower_p == 0:
        text += "lower-priority work is not preemptible"
    else:
        text += "preempting all lower-priority preemptible work would not make room in one provider"
    return text


def schedule(
    queue: Sequence[JobRequest],
    nodes: Sequence[NodeView],
    running: Sequence[RunningAllocation],
    *,
    now_s: int,
) -> Decision:
    """Decide which queued gangs start now, where, and what they preempt.

    ``now_s`` is accepted for interface stability (time-aware rules such as aging or
    reservations will need it); the current rules do not depend on it. See the module
    docstring for the rules.
    """
    del now_s
    cycle = _build(nodes, running)
    decision = Decision()
    for job in sorted(queue, key=queue_key):
        if job.num_workers < 1 or job.gpus_per_worker < 1:
            decision.pending[job.job_id] = (
                f"invalid gang shape: {job.num_workers} workers x {job.gpus_per_worker} GPUs"
            )
            continue
        classes = cycle.matching(job)
        placement = None
        if classes:
            placement = _place_free(cycle, job, classes) or _place_preempting(cycle, job, classes)
        if placement is None:
            key = (
                job.gpu_model,
                job.min_gpu_memory_bytes,
                job.num_workers,
                job.gpus_per_worker,
                job.priority,
            )
            cached = cycle.reason_cache.get(key)
            if cached is None or cached[0] != cycle.version:
                cached = (cycle.version, _reason(cycle, job, classes))
                cycle.reason_cache[key] = cached
            decision.pending[job.job_id] = cached[1]
        else:
            cycle.version += 1
            decision.placements.append(placement)
    return decision
