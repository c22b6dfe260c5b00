"""The ledger's rows: usage of one GPU of one allocation over [start, end), in whole seconds.

Rows are written in two places, both through :func:`write_usage`:

- the **ledger tick** (:func:`meter_running`, run by the scheduler loop at least every
  ``ledger_tick_s`` and at every period boundary) meters each running allocation up to a
  recent whole second: no later than now, and no later than the last heartbeat of any of
  its nodes (what the fleet can vouch for);
- the **close** of an allocation (``transition_job``) writes the rest, up to its end.

Every row lies inside one accounting period (rows are cut at period boundaries), its key
``allocation:gpu:start_s`` is unique, and the allocation's ``metered_until`` moves in the
same transaction: so reports of adjacent windows add up exactly, a month's report never
depends on when the tick ran, a crash between ticks loses nothing (the next tick or the
close writes it) and a retry doubles nothing (the key refuses it).

A report states the instant it is complete up to (:func:`complete_up_to`): the earliest
point to which a running allocation has been metered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlmodel import Session, col, func, select

from scheduler.db.models import Agreement, Allocation, AllocationGpu, Gpu, Node, UsageInterval
from scheduler.domain.periods import Grain, split

log = logging.getLogger(__name__)


def floor_s(when: datetime) -> int:
    return int(when.timestamp() // 1)


def at_second(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def gpu_seconds(start: datetime, end: datetime) -> int:
    """Whole GPU-seconds of [start, end), by telescoping floors."""
    return max(0, floor_s(end) - floor_s(start))


def write_usage(
    session: Session, alloc: Allocation, *, until: datetime, grain: Grain, now: datetime
) -> int:
    """Write ``alloc``'s usage from where it was metered to ``until``, one row per GPU per
    period it crosses; returns the rows written. Nothing before the gang ran is billed."""
    start = alloc.metered_until or alloc.running_at
    if start is None or until <= start:
        return 0
    assert alloc.id is not None
    terms = session.exec(
        select(AllocationGpu, Gpu, Agreement)
        .join(Gpu, col(Gpu.id) == col(AllocationGpu.gpu_id))
        .join(Agreement, col(Agreement.id) == col(AllocationGpu.agreement_id))
        .where(AllocationGpu.allocation_id == alloc.id)
        .order_by(col(AllocationGpu.rank), col(Gpu.index))
    ).all()
    written = 0
    for a, b in split(start, until, grain):
        for ag, gpu, agreement in terms:
            written += _add_row(session, alloc, ag, gpu, agreement, a, b, now)
    alloc.metered_until = until
    session.add(alloc)
    return written


def write_gpu_usage(
    session: Session,
    alloc: Allocation,
    term: tuple[AllocationGpu, Gpu, Agreement],
    *,
    start: datetime,
    until: datetime,
    grain: Grain,
    now: datetime,
) -> int:
    """Rows for one GPU of an allocation over [start, until), by the same keys as
    :func:`write_usage`. Used to give back the time a lost node's evidence proves its GPUs
    were held (``scheduler.services.evidence``); ``metered_until`` is the allocation's and
    does not move."""
    ag, gpu, agreement = term
    return sum(
        _add_row(session, alloc, ag, gpu, agreement, a, b, now)
        for a, b in split(start, until, grain)
    )


def _add_row(
    session: Session,
    alloc: Allocation,
    ag: AllocationGpu,
    gpu: Gpu,
    agreement: Agreement,
    a: datetime,
    b: datetime,
    now: datetime,
) -> int:
    start_s, end_s = floor_s(a), floor_s(b)
    if end_s <= start_s:
        return 0  # less than a whole second: it lands in the next piece's floor
    assert alloc.id is not None and gpu.id is not None and agreement.id is not None
    session.add(
        UsageInterval(
            key=f"{alloc.id}:{gpu.uuid}:{start_s}",
            allocation_id=alloc.id,
            job_id=alloc.job_id,
            # Terms come from the allocation, fixed when it opened: a later re-registration
            # never re-prices the past.
            provider_id=agreement.provider_id,
            site_id=alloc.site_id,
            agreement_id=agreement.id,
            node_id=ag.node_id,
            gpu_id=gpu.id,
            gpu_uuid=gpu.uuid,
            gpu_model=ag.gpu_model,
            level=agreement.level,
            started_at=a,
            ended_at=b,
            start_s=start_s,
            end_s=end_s,
            gpu_seconds=end_s - start_s,
            recorded_at=now,
        )
    )
    return 1


@dataclass(frozen=True, slots=True)
class MeterReport:
    allocations: int
    rows: int


def meter_running(session: Session, *, now: datetime, grain: Grain) -> MeterReport:
    """The ledger tick: meter every running allocation up to a whole second no later than
    now and no later than its nodes' last heartbeats (see the module docstring)."""
    cuts = session.exec(
        select(Allocation, func.min(col(Node.last_heartbeat_at)))
        .join(AllocationGpu, col(AllocationGpu.allocation_id) == col(Allocation.id))
        .join(Node, col(Node.id) == col(AllocationGpu.node_id))
        .where(col(Allocation.ended_at).is_(None), col(Allocation.running_at).is_not(None))
        .group_by(col(Allocation.id))
    ).all()
    allocations = rows = 0
    written_ids: list[int] = []
    lo_s = hi_s = None
    for alloc, last_heartbeat in cuts:
        evidence = min(now, last_heartbeat) if last_heartbeat is not None else now
        until = at_second(floor_s(evidence))
        start = alloc.metered_until or alloc.running_at
        written = write_usage(session, alloc, until=until, grain=grain, now=now)
        if written:
            allocations += 1
            rows += written
            assert alloc.id is not None and start is not None
            written_ids.append(alloc.id)
            lo_s = min(lo_s or floor_s(start), floor_s(start))
            hi_s = max(hi_s or floor_s(until), floor_s(until))
    session.flush()
    if written_ids and lo_s is not None and hi_s is not None:
        # Evidence that arrived before these rows: annotate them now (later evidence
        # annotates them as it arrives). Imported here: evidence builds on this module.
        from scheduler.services.evidence import annotate_usage

        gpu_ids = session.exec(
            select(AllocationGpu.gpu_id).where(col(AllocationGpu.allocation_id).in_(written_ids))
        ).all()
        annotate_usage(session, gpu_ids=gpu_ids, lo_s=lo_s, hi_s=hi_s)
    return MeterReport(allocations, rows)


def complete_up_to(session: Session, *, now: datetime) -> datetime:
    """The instant before which the ledger holds every GPU-second: the least point to which
    a running allocation is metered (its start, if not metered yet), or now."""
    earliest = session.exec(
        select(
            func.min(func.coalesce(col(Allocation.metered_until), col(Allocation.running_at)))
        ).where(col(Allocation.ended_at).is_(None), col(Allocation.running_at).is_not(None))
    ).one()
    if earliest is None:
        return now
    if isinstance(earliest, str):  # SQLite hands back text from an aggregate over UTC times
        earliest = datetime.fromisoformat(earliest)
    if earliest.tzinfo is None:
        earliest = earliest.replace(tzinfo=UTC)
    return min(now, earliest)
