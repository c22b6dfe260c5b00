"""Builds the policy's inputs from the database: the queue, schedulable capacity, the
allocations that hold GPUs (running, or stopping with their deadline), and how far each
provider's commitment is met this period. Read-only.

At fleet scale (10,000 nodes, 80,000 GPUs, 10,000 queued jobs) the cost was never the
number of queries but the rows and the objects made of them, so: plain columns, read
through the session's connection rather than as ORM objects; one row per node (the
database groups its GPUs), per allocation and per job; times turned into seconds once, not
converted value by value; and a ``SnapshotCache`` that the scheduler keeps, so that what
did not change since the last cycle is neither read again (an allocation's GPUs) nor built
again (a view whose row is the same). A snapshot with a cache is equal to one without."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import DateTime, Text, case, cast, func, or_, type_coerce
from sqlalchemy import select as sa_select
from sqlalchemy.sql.expression import Executable
from sqlmodel import Session, col, select

from scheduler.db.engine import among
from scheduler.db.models import (
    Agreement,
    Allocation,
    AllocationGpu,
    Gpu,
    Job,
    Node,
    Site,
    UsageInterval,
)
from scheduler.domain.enums import GpuHealth, JobStatus, NodeStatus
from scheduler.domain.periods import Grain, period_of
from scheduler.policy import JobRequest, NodeView, ProviderState, RunningAllocation

USABLE_HEALTH = (GpuHealth.ok, GpuHealth.unknown)


def queue(session: Session, cache: SnapshotCache | None = None) -> list[JobRequest]:
    """Pending jobs in queue order: one row of plain columns per job (no ORM object, and the
    spec's ``checkpointing`` flag is read in the database rather than the whole spec)."""
    checkpointing = or_(
        col(Job.checkpoint_uri).is_not(None),
        func.coalesce(col(Job.spec)["checkpointing"].as_boolean(), False),
    )
    rows = _rows(
        session,
        sa_select(
            col(Job.id),
            col(Job.priority),
            col(Job.num_workers),
            col(Job.gpus_per_worker),
            col(Job.gpu_model),
            col(Job.min_gpu_memory_gb),
            col(Job.preemptible),
            checkpointing,
            col(Job.max_runtime_s),
            _raw(col(Job.submitted_at)),
            col(Job.owner),
        )
        .where(col(Job.status) == JobStatus.pending)
        .order_by(col(Job.priority).desc(), col(Job.id)),
    )
    return (cache or SnapshotCache()).jobs.build(((r[0], tuple(r)) for r in rows), _job)


def _job(row: tuple[Any, ...]) -> JobRequest:
    (
        job_id,
        priority,
        num_workers,
        gpus_per_worker,
        gpu_model,
        memory_gb,
        preemptible,
        checkpoints,
        max_runtime_s,
        submitted_at,
        owner,
    ) = row
    return JobRequest(
        job_id=job_id,
        priority=priority,
        seq=job_id,
        num_workers=num_workers,
        gpus_per_worker=gpus_per_worker,
        gpu_model=gpu_model,
        min_gpu_memory_bytes=memory_gb * 10**9 if memory_gb else None,
        preemptible=preemptible,
        checkpointing=bool(checkpoints),
        max_runtime_s=max_runtime_s,
        submitted_s=_epoch(submitted_at),
        team=owner,
    )


def capacity(
    session: Session,
    *,
    now: datetime,
    fresh_within_s: float,
    site_fresh_within_s: float,
    cache: SnapshotCache | None = None,
) -> list[NodeView]:
    """Nodes that can take work now, with their free GPUs.

    A node can take work when it is ``ready``, its site's agent says Ray has its worker
    alive, its own heartbeat is younger than ``fresh_within_s`` (a few heartbeat
    intervals: a node that just died must not be chosen) and its site's agent reported
    within ``site_fresh_within_s`` (nobody would start the work otherwise), and NVML
    answers on it. Its GPUs that are healthy (or of unknown health) and not MIG-enabled
    are its capacity; the first of them (lowest id) gives the node's GPU model.

    A GPU is free when no allocation holds it whose workers the site has not confirmed
    gone (its ``allocation_gpu`` row's ``released_at`` is NULL, the hold the database lets
    one row at a time have): a GPU is never handed to a second gang while the first may
    still be on it, even after the first was cancelled or preempted.

    One row per node: the database groups the GPUs (rows per GPU, not queries, were the
    cost at fleet scale); a node whose usable GPUs are of more than one model costs one
    more small query, for the model of its first GPU."""
    fresh = now - timedelta(seconds=fresh_within_s)
    site_fresh = now - timedelta(seconds=site_fresh_within_s)
    usable = (
        col(Gpu.health).in_(USABLE_HEALTH),
        col(Gpu.mig_enabled).is_not(True),  # gangs take whole GPUs, not MIG instances
    )
    per_node = (
        sa_select(
            col(Gpu.node_id).label("node_id"),
            func.min(col(Gpu.id)).label("first_id"),
            func.min(col(Gpu.model)).label("model"),
            func.max(col(Gpu.model)).label("other_model"),
            func.min(col(Gpu.memory_bytes)).label("memory"),
            func.count().label("total"),
        )
        .where(*usable)
        .group_by(col(Gpu.node_id))
        .subquery("per_node")
    )
    held = sa_select(col(AllocationGpu.gpu_id)).where(
        col(AllocationGpu.released_at).is_(None), col(AllocationGpu.gpu_id) == col(Gpu.id)
    )
    free = (
        sa_select(
            col(Gpu.node_id).label("node_id"),
            func.aggregate_strings(cast(col(Gpu.id), Text), ",").label("ids"),
        )
        .where(*usable, ~held.exists())
        .group_by(col(Gpu.node_id))
        .subquery("free")
    )
    # agreements in force and sites heard from lately: a few hundred rows, joined here
    agreements = {
        agreement_id: (level, _ends(ends_at, notice_s))
        for agreement_id, level, ends_at, notice_s in _rows(
            session,
            sa_select(
                col(Agreement.id),
                col(Agreement.level),
                col(Agreement.ends_at),
                col(Agreement.reclaim_notice_s),
            ).where(col(Agreement.starts_at) <= now),
        )
    }
    sites = dict(
        _rows(
            session,
            sa_select(col(Site.id), col(Site.name)).where(col(Site.last_seen_at) >= site_fresh),
        )
    )
    rows = _rows(
        session,
        sa_select(
            col(Node.id),
            col(Node.name),
            col(Node.provider_id),
            col(Node.site_id),
            col(Node.agreement_id),
            per_node.c.first_id,
            per_node.c.model,
            per_node.c.other_model,
            per_node.c.memory,
            per_node.c.total,
            free.c.ids,
        )
        .join(per_node, per_node.c.node_id == col(Node.id))
        .outerjoin(free, free.c.node_id == col(Node.id))
        .where(
            col(Node.status) == NodeStatus.ready,
            col(Node.ray_joined).is_(True),
            col(Node.gpu_source_error).is_(None),  # NVML broken: its GPUs are unverified
            col(Node.last_heartbeat_at) >= fresh,
        )
        .order_by(col(Node.id)),
    )
    mixed = [r[5] for r in rows if r[6] != r[7]]
    first_model = (
        dict(session.exec(select(col(Gpu.id), col(Gpu.model)).where(col(Gpu.id).in_(mixed))).all())
        if mixed
        else {}
    )
    items = []
    for row in rows:
        node_id, _, _, site_id, agreement_id, first_id, model, other_model = row[:8]
        terms = agreements.get(agreement_id)
        site_name = sites.get(site_id)
        if terms is None or site_name is None:
            continue  # the agreement is not in force yet, or the site's agent is silent
        gpu_model = model if model == other_model else first_model[first_id]
        items.append((node_id, (*row, terms, site_name, gpu_model)))
    return (cache or SnapshotCache()).nodes.build(items, _node)


def _node(inputs: tuple[Any, ...]) -> NodeView:
    (node_id, name, provider_id, site_id, _, _, _, _, memory, total, ids, terms, site, model) = (
        inputs
    )
    return NodeView(
        node_id=node_id,
        name=name,
        provider_id=provider_id,
        level=terms[0],
        gpu_model=model,
        gpu_memory_bytes=memory,
        free_gpu_ids=tuple(sorted(map(int, ids.split(",")))) if ids else (),
        total_gpus=total,
        site_id=site_id,
        site_name=site,
        agreement_ends_s=terms[1],
    )


def _rows(session: Session, stmt: Executable) -> Sequence[Any]:
    """The rows of a select of plain columns, through the session's connection: the ORM's
    handling of each row, which buys nothing here, cost more than the queries."""
    return session.connection().execute(stmt).all()


def _pairs(grouped: str) -> tuple[tuple[int, int], ...]:
    """``"node:gpu,node:gpu"`` as sorted (node, GPU) pairs."""
    pairs = []
    for item in grouped.split(","):
        node, _, gpu = item.partition(":")
        pairs.append((int(node), int(gpu)))
    pairs.sort()
    return tuple(pairs)


def _ends(ends_at: datetime | None, reclaim_notice_s: int) -> int | None:
    """When new work must stop going to the agreement's nodes: its end, less the notice its
    work would get (work placed later could not be given that notice)."""
    if ends_at is None:
        return None
    return int(ends_at.timestamp()) - reclaim_notice_s


V = TypeVar("V")


class _Views(Generic[V]):
    """Views of one kind by key, each with the inputs it was built from."""

    def __init__(self) -> None:
        self._built: dict[int, tuple[tuple[Any, ...], V]] = {}

    def build(
        self, items: Iterable[tuple[int, tuple[Any, ...]]], make: Callable[[tuple[Any, ...]], V]
    ) -> list[V]:
        """A view of each (key, inputs), in order: the one built last cycle where its inputs
        are unchanged, else a new one. Views whose key does not come again are dropped."""
        built: dict[int, tuple[tuple[Any, ...], V]] = {}
        out = []
        last = self._built
        for key, inputs in items:
            kept = last.get(key)
            view = kept[1] if kept is not None and kept[0] == inputs else make(inputs)
            built[key] = (inputs, view)
            out.append(view)
        self._built = built
        return out


class SnapshotCache:
    """What the snapshot keeps from one cycle to the next, so that a cycle at fleet scale
    reads and builds little more than what changed. One per scheduler; not thread-safe.

    - The (node, GPU) pairs of each open allocation: its ``allocation_gpu`` rows are
      written in the transaction that opens it and never move, so a cycle reads only those
      of the allocations it has not seen yet, and forgets those no longer open.
    - Each view (job, node, allocation) with the inputs it was built from: inputs read again
      unchanged give the same view back (views are frozen values, which the policy may be
      handed again), and a view whose row is no longer read is dropped.

    Without one, each call reads and builds everything."""

    def __init__(self) -> None:
        self._pairs: dict[int, tuple[tuple[int, int], ...]] = {}
        self.jobs: _Views[JobRequest] = _Views()
        self.nodes: _Views[NodeView] = _Views()
        self.allocations: _Views[RunningAllocation] = _Views()

    def gpus_of(
        self, session: Session, open_ids: Collection[int]
    ) -> dict[int, tuple[tuple[int, int], ...]]:
        """The sorted (node, GPU) pairs of each of ``open_ids``."""
        wanted = set(open_ids)
        self._pairs = {a: p for a, p in self._pairs.items() if a in wanted}
        missing = sorted(wanted - self._pairs.keys())
        pair = cast(col(AllocationGpu.node_id), Text) + ":" + cast(col(AllocationGpu.gpu_id), Text)
        for n in range(0, len(missing), _CHUNK):
            chunk = missing[n : n + _CHUNK]
            for alloc_id, grouped in _rows(
                session,
                sa_select(col(AllocationGpu.allocation_id), func.aggregate_strings(pair, ","))
                .where(among(col(AllocationGpu.allocation_id), chunk, session))
                .group_by(col(AllocationGpu.allocation_id)),
            ):
                self._pairs[alloc_id] = _pairs(grouped)
        return self._pairs


_CHUNK = 5000  # ids per query: an IN list stays far below SQLite's limit on parameters


def running(session: Session, cache: SnapshotCache | None = None) -> list[RunningAllocation]:
    """Open allocations: running ones (the work a new job might preempt) and those asked
    to stop, with the deadline by which their GPUs come free and the job they stop for.
    One row per allocation; their GPUs are read once per allocation (``SnapshotCache``)."""
    rows = _rows(
        session,
        sa_select(
            col(Allocation.id),
            col(Allocation.job_id),
            col(Job.priority),
            col(Job.preemptible),
            col(Job.max_runtime_s),
            col(Allocation.provider_id),
            col(Allocation.site_id),
            _raw(col(Allocation.started_at)),
            _raw(col(Allocation.running_at)),
            _raw(col(Allocation.last_checkpoint_at)),
            _raw(col(Allocation.stop_requested_at)),
            _raw(col(Allocation.stop_deadline_at)),
            col(Allocation.stop_for_job_id),
        )
        .join(Job, col(Job.id) == col(Allocation.job_id))
        .where(col(Allocation.ended_at).is_(None))
        .order_by(col(Allocation.id)),
    )
    cache = cache or SnapshotCache()
    held = cache.gpus_of(session, [r[0] for r in rows])
    return cache.allocations.build(((r[0], (*r, held.get(r[0], ()))) for r in rows), _allocation)


def _allocation(inputs: tuple[Any, ...]) -> RunningAllocation:
    (
        alloc_id,
        job_id,
        priority,
        preemptible,
        max_runtime_s,
        provider_id,
        site_id,
        started_at,
        running_at,
        last_checkpoint_at,
        stop_requested_at,
        stop_deadline_at,
        stop_for_job_id,
        gpus,
    ) = inputs
    started = _epoch(started_at)
    since = _epoch(running_at) if running_at else None
    stopping = stop_requested_at is not None
    return RunningAllocation(
        allocation_id=alloc_id,
        job_id=job_id,
        priority=priority,
        preemptible=preemptible,
        provider_id=provider_id,
        started_at_s=started,
        gpus=gpus,
        site_id=site_id,
        running_since_s=since,
        last_checkpoint_s=_epoch(last_checkpoint_at) if last_checkpoint_at else None,
        expected_end_s=((since or started) + max_runtime_s if max_runtime_s is not None else None),
        stopping_until_s=_epoch(stop_deadline_at or stop_requested_at) if stopping else None,
        stopping_for_job=stop_for_job_id if stopping else None,
    )


def _raw(column: Any) -> Any:
    """A time column as the driver reads it, without ``UTCDateTime``'s conversion of every
    value (at fleet scale, tens of thousands of values a cycle); read it with ``_epoch``."""
    return type_coerce(column, DateTime(timezone=True))


def _epoch(when: datetime) -> int:
    """Whole Unix seconds of a time read through ``_raw``: aware on PostgreSQL, naive UTC on
    SQLite (as ``UTCDateTime`` stores it)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())


def providers(session: Session, *, now: datetime, grain: Grain) -> list[ProviderState]:
    """Each provider's commitment for the current period, pro rata to ``now``, against the
    GPU-seconds the ledger holds for it in the period so far (the fairness input)."""
    period = period_of(now, grain)
    start, end = period.start, period.end
    length = int((end - start).total_seconds())
    elapsed = int((now - start).total_seconds())
    committed: dict[int, int] = defaultdict(int)
    for agreement in session.exec(
        select(Agreement).where(
            col(Agreement.committed_gpu_hours_per_month).is_not(None),
            col(Agreement.starts_at) <= now,
        )
    ):
        if agreement.ends_at is not None and agreement.ends_at <= now:
            continue
        hours = agreement.committed_gpu_hours_per_month or 0
        # per month, scaled to the period's length (a day's grain gets a day's share)
        per_period = hours * 3600 * length // (30 * 86400)
        committed[agreement.provider_id] += per_period * elapsed // max(1, length)
    if not committed:
        return []
    lo, hi = int(start.timestamp()), int(now.timestamp())
    delivered = dict(
        session.exec(
            select(
                UsageInterval.provider_id,
                func.sum(
                    case((col(UsageInterval.end_s) < hi, col(UsageInterval.end_s)), else_=hi)
                    - case((col(UsageInterval.start_s) > lo, col(UsageInterval.start_s)), else_=lo)
                ),
            )
            .where(
                col(UsageInterval.provider_id).in_(list(committed)),
                UsageInterval.end_s > lo,
                UsageInterval.start_s < hi,
            )
            .group_by(col(UsageInterval.provider_id))
        ).all()
    )
    return [
        ProviderState(pid, target, int(delivered.get(pid) or 0))
        for pid, target in sorted(committed.items())
    ]
