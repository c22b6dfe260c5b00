"""Evidence: what a node's agent measured on each GPU, window by window, and what the
ledger draws from it.

Agents aggregate their samples into per-GPU windows ([start_s, end_s), aligned to
``EVIDENCE_WINDOW_S`` of the server's clock) and send them inline with heartbeats, or in
batches from their spool after an outage. Invariants:

- A window is stored once: its key is (node, GPU, start_s), so a replay, or a replay of a
  replay, stores nothing twice (``EvidenceAck.duplicates`` counts what was already there).
- Evidence never changes a GPU-second that was billed. Usage rows carry it as annotations
  (``evidence_s``, ``utilization_pct_avg``, ``energy_mj``, ``process_seen``), recomputed
  from the windows that overlap them whenever a window or a row arrives, so the order in
  which rows and evidence reach the server does not matter.
- Metering follows the evidence. A node that went silent had its allocations ended at its
  last heartbeat (the lost-node rule). When it comes back with windows for the gap showing
  a compute process on a GPU of such an allocation, the allocation gets that time back on
  that GPU, window after contiguous window, up to when the site confirmed the workers gone
  (``released_at``), and never past a window without a process (an idle or absent process
  ends the credit; those windows stay on record for statements). The rows use the
  ledger's own keys, so a credit is given once however often the evidence is replayed, and
  it never overlaps another allocation on the GPU: the GPU was not free before
  ``released_at``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, func, select

from scheduler.db.models import (
    Agreement,
    Allocation,
    AllocationGpu,
    Gpu,
    GpuEvidence,
    Node,
    UsageInterval,
)
from scheduler.domain.enums import EndReason
from scheduler.domain.periods import Grain
from scheduler.errors import ValidationFailed
from scheduler.schemas import EvidenceAck, EvidenceWindow
from scheduler.services.ledger import at_second, floor_s, write_gpu_usage

log = logging.getLogger(__name__)

CREDIT_LOOKBACK = timedelta(days=7)
"""Allocations ended by the lost-node rule longer ago than this get no credit: a node that
comes back after a week has a spool older than any statement still open."""

_CHUNK = 500


@dataclass(frozen=True, slots=True)
class _Window:
    gpu_id: int
    start_s: int
    end_s: int
    utilization_pct_avg: int | None
    energy_mj: int | None
    process_seen: bool | None


def store_evidence(
    session: Session,
    *,
    node: Node,
    windows: Sequence[EvidenceWindow],
    now: datetime,
    grain: Grain,
) -> EvidenceAck:
    """Store ``node``'s windows (each once), annotate the usage rows they overlap and give
    back the time they prove a lost node's GPUs were held. Windows of GPUs the node has not
    registered are refused, all of them, naming the first."""
    known = set(session.exec(select(Gpu.uuid).where(Gpu.node_id == node.id)))
    for w in windows:
        if w.uuid not in known:
            raise ValidationFailed("windows", f"GPU {w.uuid} is not registered on this node")
    assert node.id is not None
    (ack,) = store_evidence_many(session, [(node.id, windows)], now=now, grain=grain)
    return ack


def store_evidence_many(
    session: Session,
    batches: Sequence[tuple[int, Sequence[EvidenceWindow]]],
    *,
    now: datetime,
    grain: Grain,
) -> list[EvidenceAck]:
    """``store_evidence`` for several nodes (by id) at once, with a fixed number of
    statements; every window's GPU must be registered on its node (checked by the
    caller)."""
    node_ids = sorted({n for n, _ in batches})
    gpu_ids = {
        (nid, uuid): gid
        for nid, uuid, gid in session.exec(
            select(Gpu.node_id, Gpu.uuid, Gpu.id).where(col(Gpu.node_id).in_(node_ids))
        )
        if gid is not None
    }
    rows: dict[str, dict[str, object]] = {}
    owners: list[list[str]] = []
    for node_id, windows in batches:
        keys = []
        for w in windows:
            key = f"{node_id}:{w.uuid}:{w.start_s}"
            keys.append(key)
            rows.setdefault(
                key,
                {
                    "key": key,
                    "node_id": node_id,
                    "gpu_id": gpu_ids[(node_id, w.uuid)],
                    "start_s": w.start_s,
                    "end_s": w.end_s,
                    "samples": w.samples,
                    "utilization_pct_avg": w.utilization_pct_avg,
                    "energy_mj": w.energy_mj,
                    "process_seen": w.process_seen,
                    "received_at": now,
                },
            )
        owners.append(keys)
    keys = list(rows)
    known: set[str] = set()
    for i in range(0, len(keys), _CHUNK):
        known.update(
            session.exec(
                select(GpuEvidence.key).where(col(GpuEvidence.key).in_(keys[i : i + _CHUNK]))
            )
        )
    new = [row for key, row in rows.items() if key not in known]
    credited: dict[int, int] = {}
    if new:
        _insert_ignoring_duplicates(session, new)
        touched = {int(r["gpu_id"]) for r in new}  # type: ignore[call-overload]
        lo = min(int(r["start_s"]) for r in new)  # type: ignore[call-overload]
        hi = max(int(r["end_s"]) for r in new)  # type: ignore[call-overload]
        credited = credit_gaps(session, gpu_ids=touched, now=now, grain=grain)
        annotate_usage(session, gpu_ids=touched, lo_s=lo, hi_s=hi)
    acks = []
    for (node_id, windows), keys in zip(batches, owners, strict=True):
        fresh = sum(1 for k in set(keys) if k not in known)
        acks.append(
            EvidenceAck(
                stored=fresh,
                duplicates=len(windows) - fresh,
                credited_gpu_seconds=credited.get(node_id, 0),
            )
        )
    return acks


def _insert_ignoring_duplicates(session: Session, rows: list[dict[str, object]]) -> None:
    """One multi-row statement; a window a concurrent request stored first is skipped."""
    dialect = session.get_bind().dialect.name
    table = GpuEvidence.__table__  # type: ignore[attr-defined]
    module = postgresql if dialect == "postgresql" else sqlite
    for i in range(0, len(rows), _CHUNK):
        stmt = module.insert(table).on_conflict_do_nothing(index_elements=["key"])
        session.execute(stmt, rows[i : i + _CHUNK])


def _windows(session: Session, gpu_ids: Iterable[int], lo_s: int, hi_s: int) -> list[_Window]:
    ids = sorted(gpu_ids)
    found: list[_Window] = []
    for i in range(0, len(ids), _CHUNK):
        for r in session.execute(
            sa_select(
                col(GpuEvidence.gpu_id),
                col(GpuEvidence.start_s),
                col(GpuEvidence.end_s),
                col(GpuEvidence.utilization_pct_avg),
                col(GpuEvidence.energy_mj),
                col(GpuEvidence.process_seen),
            )
            .where(
                col(GpuEvidence.gpu_id).in_(ids[i : i + _CHUNK]),
                col(GpuEvidence.start_s) < hi_s,
                col(GpuEvidence.end_s) > lo_s,
            )
            .order_by(col(GpuEvidence.gpu_id), col(GpuEvidence.start_s))
        ):
            found.append(_Window(*r))
    return found


def annotate_usage(session: Session, *, gpu_ids: Iterable[int], lo_s: int, hi_s: int) -> int:
    """Recompute the evidence of every usage row of ``gpu_ids`` overlapping [lo_s, hi_s)
    from the windows overlapping it; returns the rows updated.

    Utilisation is the average weighted by the seconds each window shares with the row;
    energy is each window's energy pro rata to those seconds (integer millijoules, floor);
    a process was seen if any overlapping window saw one. Unknown stays ``None``."""
    ids = sorted(set(gpu_ids))
    if not ids or hi_s <= lo_s:
        return 0
    usage: list[tuple[int, int, int, int]] = []
    for i in range(0, len(ids), _CHUNK):
        usage.extend(
            (uid, gid, s, e)
            for uid, gid, s, e in session.exec(
                select(
                    UsageInterval.id,
                    UsageInterval.gpu_id,
                    UsageInterval.start_s,
                    UsageInterval.end_s,
                ).where(
                    col(UsageInterval.gpu_id).in_(ids[i : i + _CHUNK]),
                    col(UsageInterval.start_s) < hi_s,
                    col(UsageInterval.end_s) > lo_s,
                )
            )
            if uid is not None
        )
    if not usage:
        return 0
    by_gpu: dict[int, list[_Window]] = defaultdict(list)
    for w in _windows(
        session, {g for _, g, _, _ in usage}, min(u[2] for u in usage), max(u[3] for u in usage)
    ):
        by_gpu[w.gpu_id].append(w)
    updates = []
    for uid, gid, start_s, end_s in usage:
        covered = util_weight = util_sum = 0
        energy: int | None = None
        seen: bool | None = None
        for w in by_gpu.get(gid, ()):
            overlap = min(end_s, w.end_s) - max(start_s, w.start_s)
            if overlap <= 0:
                continue
            covered += overlap
            if w.utilization_pct_avg is not None:
                util_sum += w.utilization_pct_avg * overlap
                util_weight += overlap
            if w.energy_mj is not None:
                energy = (energy or 0) + w.energy_mj * overlap // (w.end_s - w.start_s)
            if w.process_seen is not None:
                seen = bool(seen) or w.process_seen
        updates.append(
            {
                "uid": uid,
                "evidence_s": min(covered, end_s - start_s),
                "utilization_pct_avg": util_sum // util_weight if util_weight else None,
                "energy_mj": energy,
                "process_seen": seen,
            }
        )
    table = UsageInterval.__table__  # type: ignore[attr-defined]
    session.connection().execute(
        update(table)
        .where(table.c.id == bindparam("uid"))
        .values(
            evidence_s=bindparam("evidence_s"),
            utilization_pct_avg=bindparam("utilization_pct_avg"),
            energy_mj=bindparam("energy_mj"),
            process_seen=bindparam("process_seen"),
        ),
        updates,
    )
    return len(updates)


def credit_gaps(
    session: Session, *, gpu_ids: set[int], now: datetime, grain: Grain
) -> dict[int, int]:
    """Give back to allocations the lost-node rule ended the GPU-seconds their GPUs'
    evidence shows held by a process (module docstring); the seconds given, per node."""
    terms = session.exec(
        select(Allocation, AllocationGpu, Gpu, Agreement)
        .join(AllocationGpu, col(AllocationGpu.allocation_id) == col(Allocation.id))
        .join(Gpu, col(Gpu.id) == col(AllocationGpu.gpu_id))
        .join(Agreement, col(Agreement.id) == col(AllocationGpu.agreement_id))
        .where(
            col(AllocationGpu.gpu_id).in_(sorted(gpu_ids)),
            Allocation.end_reason == EndReason.node_lost,
            col(Allocation.running_at).is_not(None),
            col(Allocation.ended_at) >= now - CREDIT_LOOKBACK,
        )
    ).all()
    credited: dict[int, int] = defaultdict(int)
    for alloc, ag, gpu, agreement in terms:
        assert alloc.id is not None and alloc.ended_at is not None and gpu.id is not None
        billed_to = session.exec(
            select(func.max(UsageInterval.end_s)).where(
                UsageInterval.allocation_id == alloc.id, UsageInterval.gpu_id == gpu.id
            )
        ).one()
        start_s = max(int(billed_to or 0), floor_s(alloc.ended_at))
        cap_s = floor_s(min(alloc.released_at or now, now))
        if start_s >= cap_s:
            continue
        end_s = start_s
        for w in _windows(session, [gpu.id], start_s, cap_s):
            if w.start_s > end_s or not w.process_seen:
                break  # a hole in the evidence, or no process: the credit stops here
            end_s = max(end_s, w.end_s)
        end_s = min(end_s, cap_s)
        if end_s <= start_s:
            continue
        write_gpu_usage(
            session,
            alloc,
            (ag, gpu, agreement),
            start=at_second(start_s),
            until=at_second(end_s),
            grain=grain,
            now=now,
        )
        credited[ag.node_id] += end_s - start_s
        log.info(
            "allocation %s: %ss on GPU %s given back from its node's evidence",
            alloc.id,
            end_s - start_s,
            gpu.uuid,
        )
    session.flush()
    return dict(credited)
