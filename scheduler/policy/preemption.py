"""Preemption that loses little: which running work a job may stop, and which it does.

Eligible victims of a job (all must hold): preemptible; of strictly lower priority; not
already stopping or chosen this cycle; running for at least ``min_runtime_s``; holding
GPUs on nodes the job can use. Within one site, victims are added in order of the
GPU-seconds they would lose (GPUs x time since their last checkpoint, or since they
started), fewest first, then lowest priority, then most recently started, until the gang
fits; victims that turn out unnecessary are dropped again, newest-added first. Among sites
the set losing the fewest GPU-seconds wins, then the fewest GPUs stopped, then the best
placement. The policy then preempts only when the job's gain (its GPUs x how much sooner
it starts) is at least ``preempt_gain_factor`` times that loss.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from scheduler.policy.capacity import Plan, Pool, Prefs
from scheduler.policy.config import PolicyConfig
from scheduler.policy.types import JobRequest, RunningAllocation


@dataclass(slots=True)
class Victim:
    alloc: RunningAllocation
    by_node: dict[int, list[int]]  # node_id -> GPU ids, only on nodes that were passed in
    loss_gpu_s: int

    @property
    def gpus(self) -> int:
        return len(self.alloc.gpus)


def loss_of(alloc: RunningAllocation, now_s: int) -> int:
    """GPU-seconds of work ``alloc`` loses if stopped now: since its last checkpoint."""
    since = alloc.since_s
    if alloc.last_checkpoint_s is not None:
        since = max(since, alloc.last_checkpoint_s)
    return len(alloc.gpus) * max(0, now_s - since)


@dataclass(slots=True)
class Victims:
    """The eligible victims of every site, in victim order, and bounds for quick rejects."""

    by_site: dict[tuple[int, int], list[Victim]] = field(default_factory=dict)
    # per site: victims' priorities sorted ascending, and the running sum of their GPUs
    priorities: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    cumulative: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)
    lower_preemptible: list[int] = field(default_factory=list)  # sorted priorities
    lower_fixed: list[int] = field(default_factory=list)  # sorted priorities
    too_young: list[int] = field(default_factory=list)  # sorted priorities

    def upper_bound(self, site: tuple[int, int], priority: int) -> int:
        """GPUs all eligible victims below ``priority`` hold in ``site`` (before matching)."""
        prios = self.priorities.get(site)
        if not prios:
            return 0
        i = bisect.bisect_left(prios, priority)
        return self.cumulative[site][i - 1] if i else 0


def index_victims(
    running: Iterable[RunningAllocation],
    pools: dict[tuple[int, int], Pool],
    now_s: int,
    config: PolicyConfig,
) -> Victims:
    out = Victims()
    for alloc in running:
        if alloc.stopping_until_s is not None:
            continue
        if not alloc.preemptible:
            out.lower_fixed.append(alloc.priority)
            continue
        if now_s - alloc.since_s < config.min_runtime_s:
            out.too_young.append(alloc.priority)
            continue
        out.lower_preemptible.append(alloc.priority)
        pool = pools.get(alloc.site_key)
        by_node: dict[int, list[int]] = {}
        for node_id, gpu_id in alloc.gpus:
            if pool is not None and node_id in pool.nodes:
                by_node.setdefault(node_id, []).append(gpu_id)
        out.by_site.setdefault(alloc.site_key, []).append(
            Victim(alloc, by_node, loss_of(alloc, now_s))
        )
    for site, victims in out.by_site.items():
        if config.victim_order == "priority":
            victims.sort(key=lambda v: (v.alloc.priority, -v.alloc.since_s, -v.alloc.allocation_id))
        else:
            victims.sort(
                key=lambda v: (
                    v.loss_gpu_s,
                    v.alloc.priority,
                    -v.alloc.since_s,
                    -v.alloc.allocation_id,
                )
            )
        pairs = sorted((v.alloc.priority, v.gpus) for v in victims)
        out.priorities[site] = [p for p, _ in pairs]
        total, cum = 0, []
        for _, g in pairs:
            total += g
            cum.append(total)
        out.cumulative[site] = cum
    out.lower_preemptible.sort()
    out.lower_fixed.sort()
    out.too_young.sort()
    return out


@dataclass(slots=True)
class Choice:
    pool: Pool
    victims: list[Victim]
    overrides: dict[int, int]  # node -> free + victims' GPUs
    plan: Plan
    loss_gpu_s: int
    key: tuple[int, ...]


def victims_in(
    victims: Victims, pool: Pool, job: JobRequest, classes: frozenset[int], prefs: Prefs
) -> tuple[list[Victim], dict[int, int]] | None:
    """The victim set for ``job`` in ``pool`` and the augmented GPU counts, or None."""
    n, g = job.num_workers, job.gpus_per_worker
    cap = pool.free_capacity(classes, g, prefs)[0]
    aug: dict[int, int] = {}
    chosen: list[Victim] = []

    def contrib(victim: Victim) -> Iterable[tuple[int, int]]:
        for node_id, ids in victim.by_node.items():
            node = pool.nodes[node_id]
            if node.cls in classes and prefs[node.rank] is not None:
                yield node_id, len(ids)

    for victim in victims.by_site.get(pool.key, ()):
        if victim.alloc.priority >= job.priority or victim.alloc.allocation_id in victims.taken:
            continue
        gains = list(contrib(victim))
        if not gains:
            continue  # its GPUs cannot host this job; stopping it would be pure loss
        chosen.append(victim)
        for node_id, count in gains:
            old = aug.get(node_id, len(pool.nodes[node_id].free))
            aug[node_id] = old + count
            cap += (old + count) // g - old // g
        if cap >= n:
            break
    if cap < n:
        return None
    for victim in reversed(chosen[:-1]):  # drop the ones not needed after all
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


def best_choice(
    victims: Victims,
    pools: Iterable[Pool],
    job: JobRequest,
    classes: frozenset[int],
    prefs: Prefs,
    fairness: dict[int, int],
    *,
    by_loss: bool = True,
) -> Choice | None:
    """The least-loss way to make room for ``job`` by preemption, or None (``by_loss``
    False: the fewest GPUs stopped, Kueue's way)."""
    n, g = job.num_workers, job.gpus_per_worker
    best: Choice | None = None
    for pool in pools:
        free_gpus = pool.free_capacity(classes, g, prefs)[1]
        if free_gpus + victims.upper_bound(pool.key, job.priority) < n * g:
            continue
        if pool.static_capacity(classes, g, prefs)[0] < n:
            continue
        found = victims_in(victims, pool, job, classes, prefs)
        if found is None:
            continue
        chosen, aug = found
        plan = pool.plan(classes, g, n, prefs, aug)
        if plan is None:
            continue
        loss = sum(v.loss_gpu_s for v in chosen)
        stopped = sum(v.gpus for v in chosen)
        cost = (loss, stopped) if by_loss else (stopped, loss)
        if best is not None and cost > best.key[:2]:
            continue
        key = (
            *cost,
            *pool.score(plan, g, prefs, aug),
            fairness.get(pool.provider_id, 0),
            pool.provider_id,
            pool.site_id,
        )
        if best is None or key < best.key:
            best = Choice(pool, chosen, aug, plan, loss, key)
    return best
