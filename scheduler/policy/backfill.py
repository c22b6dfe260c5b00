"""Backfill with reservations: when a job that does not fit now will start, and keeping the
GPUs it counts on for it.

A reservation is recomputed every cycle from the release timeline (``capacity.Pool.curve``);
it is the earliest time at which the gang fits in some site, counting free GPUs and the
expected releases of running work (and of gangs placed this cycle), never GPUs held this
cycle. The free GPUs the reservation's plan uses at that time are held until then: a lower
job may borrow them only if it is expected to end by the reservation's start
(``Pool.borrowable``), so it never delays the reserved job. The released GPUs it counts on
are taken out of every later job's timeline (``Pool.consume``), so two reservations never
count on the same GPUs; they are not free now, so nothing else can take them this cycle,
and the next cycle recomputes everything.

Only reservations starting within ``backfill_window_s`` hold anything: further ahead, the
expected ends they rest on (``max_runtime``, or the default estimate) are too uncertain to
keep GPUs idle for, so the reservation is a forecast shown in the job's reason, and it
becomes a hold once its start comes within the window.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from scheduler.policy.capacity import Pool, Prefs
from scheduler.policy.types import JobRequest, Reservation


def earliest_start(
    pools: Iterable[Pool],
    job: JobRequest,
    classes: frozenset[int],
    prefs: Prefs,
    now_s: int,
    fairness: dict[int, int],
) -> tuple[int, Pool] | None:
    """(time, site) at which ``job`` can start soonest without preempting, or None."""
    n, g = job.num_workers, job.gpus_per_worker
    best: tuple[tuple[int, ...], int, Pool] | None = None
    for pool in pools:
        if pool.static_capacity(classes, g, prefs)[0] < n:
            continue
        t = pool.earliest(classes, g, n, prefs, now_s)
        if t is None:
            continue
        key = (t, fairness.get(pool.provider_id, 0), pool.provider_id, pool.site_id)
        if best is None or key < best[0]:
            best = (key, t, pool)
    return None if best is None else (best[1], best[2])


def reserve(
    pool: Pool,
    job: JobRequest,
    classes: frozenset[int],
    prefs: Prefs,
    start_s: int,
    *,
    hold: bool = True,
    end_s: int | None = None,
) -> Reservation | None:
    """Hold, until ``start_s``, the free GPUs of ``pool`` that ``job``'s plan at ``start_s``
    uses; the reservation, or None if (against the curve) no plan exists then. With
    ``hold`` False (the start lies beyond the backfill window) it is a forecast only:
    nothing is held, and the GPUs it would count on stay in other jobs' timelines.
    ``end_s`` is when the reserved job is expected to end: its GPUs come back into the
    timeline then, so a later job can reserve behind it."""
    if not hold:
        return Reservation(job.job_id, pool.provider_id, pool.site_id, start_s, pool.site_name)
    g = job.gpus_per_worker
    avail, released = pool.available_at(classes, prefs, start_s)
    plan = pool.plan(classes, g, job.num_workers, prefs, avail)
    if plan is None:
        return None
    for node_id, k in plan:
        need = k * g
        from_released = min(need, released.get(node_id, 0))
        pool.consume(node_id, from_released)
        if need > from_released:
            pool.hold(node_id, need - from_released, start_s)
        if end_s is not None:
            bisect.insort(pool.releases, (end_s, node_id, need, -1 - job.job_id))
    pool.version += 1
    return Reservation(job.job_id, pool.provider_id, pool.site_id, start_s, pool.site_name)
