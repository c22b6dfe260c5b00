"""The heartbeat path's database statements: a fixed, small number per batch of heartbeats.

At fleet scale (20,000 nodes of 8 GPUs every 4 s: 5,000 node reports and 40,000 GPU
samples a second) the ORM's unit of work is far too slow, and so is writing every GPU
sample. What a heartbeat batch writes, with one statement each (on PostgreSQL a single
``UPDATE ... FROM unnest(...)``; on SQLite, one writer and a small fleet, an
``executemany``):

- ``record_liveness``: each node's last heartbeat, clock skew and NVML error, a lost node
  back to ready; returns each node's status and its GPUs held by open allocations (the
  reply's busy flags; on PostgreSQL in the same statement) and refuses nothing silently: a
  node missing from the answer was retired or removed;
- ``write_gpu_health``: the GPUs whose health or reasons changed;
- ``write_gpu_samples``: the latest metrics of many GPUs (utilisation, memory, power,
  energy, temperature, processes, throttle reasons), written every
  ``heartbeat_sample_flush_s`` rather than with every heartbeat (scheduler/api/heartbeats.py).

``load_refs`` reads what the heartbeat path keeps in memory about a node: its id, provider,
site and GPUs with their last written health.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, update
from sqlalchemy import select as columns
from sqlmodel import Session, col, select

from scheduler.db.models import AllocationGpu, Gpu, Node, Site
from scheduler.domain.enums import GpuHealth, NodeStatus

_CHUNK = 5_000


@dataclass(slots=True)
class GpuRef:
    id: int
    health: GpuHealth
    reasons: str | None


@dataclass(slots=True)
class NodeRef:
    """What the heartbeat path keeps about a node: it never changes without a registration
    (GPUs), an admin's site move (site) or a retirement (refused by ``record_liveness``)."""

    id: int
    name: str
    provider_id: int
    site_id: int
    clock_skew_ms: int | None
    gpu_source_error: str | None
    site: str = ""
    gpus: dict[str, GpuRef] = field(default_factory=dict)
    uuids: dict[int, str] = field(default_factory=dict)


def load_refs(session: Session, *, names: Sequence[str] | None = None) -> dict[str, NodeRef]:
    """Nodes by name (all of them when ``names`` is None) with their GPUs; retired nodes are
    included (a heartbeat from one is refused with the reason)."""
    stmt = columns(
        col(Node.id),
        col(Node.name),
        col(Node.provider_id),
        col(Node.site_id),
        col(Node.clock_skew_ms),
        col(Node.gpu_source_error),
        col(Site.name),
    ).join(Site, col(Site.id) == col(Node.site_id))
    if names is not None:
        stmt = stmt.where(col(Node.name).in_(names))
    refs: dict[str, NodeRef] = {}
    by_id: dict[int, NodeRef] = {}
    for nid, name, provider_id, site_id, skew, error, site in session.execute(stmt):
        assert nid is not None
        ref = NodeRef(nid, name, provider_id, site_id, skew, error, site)
        refs[name] = by_id[nid] = ref
    gpus = columns(
        col(Gpu.node_id), col(Gpu.id), col(Gpu.uuid), col(Gpu.health), col(Gpu.health_reasons)
    )
    if names is not None:
        gpus = gpus.where(col(Gpu.node_id).in_(list(by_id)))
    for node_id, gid, uuid, health, reasons in session.execute(gpus):
        owner = by_id.get(node_id)
        if owner is not None:
            owner.gpus[uuid] = GpuRef(gid, health, reasons)
            owner.uuids[gid] = uuid
    return refs


@dataclass(frozen=True, slots=True)
class Liveness:
    node_id: int
    clock_skew_ms: int | None
    gpu_source_error: str | None


@dataclass(frozen=True, slots=True)
class NodeState:
    """A node as ``record_liveness`` left it: the reply's status."""

    status: NodeStatus
    status_reason: str | None
    status_set_by: str | None
    clock_skew_ms: int | None
    was_lost: bool
    held: frozenset[int]  # its GPUs held by open allocations: the reply's busy flags


def record_liveness(
    session: Session, rows: Sequence[Liveness], *, now: datetime
) -> dict[int, NodeState]:
    """Last heartbeat ``now`` (never moved back), skew (kept when not sent), NVML error,
    and a lost node back to ready, for every node of ``rows`` not retired; their states.
    One row per node (the last wins)."""
    # In id order: rows are then locked in the same order by every replica's batches
    # (PostgreSQL walks the unnest in order), so two batches cannot deadlock.
    last = sorted({r.node_id: r for r in rows}.values(), key=lambda r: r.node_id)
    if not last:
        return {}
    if session.get_bind().dialect.name == "postgresql":
        return _liveness_postgresql(session, last, now)
    return _liveness_sqlite(session, last, now)


_LIVENESS_PG = """
WITH up AS (
    UPDATE node AS n SET
        last_heartbeat_at = GREATEST(n.last_heartbeat_at, %(now)s),
        clock_skew_ms = COALESCE(v.skew, n.clock_skew_ms),
        gpu_source_error = v.err,
        status = CASE WHEN n.status = 'lost' THEN 'ready' ELSE n.status END,
        status_reason = CASE WHEN n.status = 'lost' THEN NULL ELSE n.status_reason END
    FROM (
        SELECT u.id, u.skew, u.err, o.status AS was
        FROM unnest(
            CAST(%(ids)s AS integer[]), CAST(%(skews)s AS bigint[]), CAST(%(errs)s AS text[])
        ) AS u(id, skew, err)
        JOIN node AS o ON o.id = u.id
    ) AS v
    WHERE n.id = v.id AND n.status <> 'retired'
    RETURNING n.id, n.status, n.status_reason, n.status_set_by, n.clock_skew_ms, v.was
)
SELECT up.*, ARRAY(
    SELECT a.gpu_id FROM allocation_gpu AS a
    WHERE a.node_id = up.id AND a.released_at IS NULL
) AS held
FROM up
"""


def _liveness_postgresql(
    session: Session, rows: list[Liveness], now: datetime
) -> dict[int, NodeState]:
    result = _pg(
        session,
        _LIVENESS_PG,
        {
            "now": now,
            "ids": [r.node_id for r in rows],
            "skews": [r.clock_skew_ms for r in rows],
            "errs": [r.gpu_source_error for r in rows],
        },
    )
    return {
        nid: NodeState(
            NodeStatus(status), reason, set_by, skew, was == NodeStatus.lost.value, frozenset(held)
        )
        for nid, status, reason, set_by, skew, was, held in result
    }


def _liveness_sqlite(session: Session, rows: list[Liveness], now: datetime) -> dict[int, NodeState]:
    ids = [r.node_id for r in rows]
    before = {
        nid: (status, last)
        for nid, status, last in session.exec(
            select(Node.id, Node.status, Node.last_heartbeat_at).where(col(Node.id).in_(ids))
        )
    }
    table = Node.__table__  # type: ignore[attr-defined]
    params: list[dict[str, Any]] = []
    for r in rows:
        if r.node_id not in before or before[r.node_id][0] == NodeStatus.retired:
            continue
        status, last = before[r.node_id]
        params.append(
            {
                "b_id": r.node_id,
                "b_last": max(last, now),
                "b_err": r.gpu_source_error,
                "b_skew": r.clock_skew_ms,
                "b_lost": status == NodeStatus.lost,
            }
        )
    if params:
        session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values(
                last_heartbeat_at=bindparam("b_last"),
                gpu_source_error=bindparam("b_err"),
                clock_skew_ms=func.coalesce(bindparam("b_skew"), table.c.clock_skew_ms),
            ),
            params,
        )
        back = [p["b_id"] for p in params if p["b_lost"]]
        if back:
            session.execute(
                update(table)
                .where(table.c.id.in_(back))
                .values(status=NodeStatus.ready, status_reason=None)
            )
    lost = {p["b_id"] for p in params if p["b_lost"]}
    held = _held_by_node(session, [p["b_id"] for p in params])
    return {
        nid: NodeState(status, reason, set_by, skew, nid in lost, frozenset(held.get(nid, ())))
        for nid, status, reason, set_by, skew in session.execute(
            columns(
                col(Node.id),
                col(Node.status),
                col(Node.status_reason),
                col(Node.status_set_by),
                col(Node.clock_skew_ms),
            ).where(col(Node.id).in_([p["b_id"] for p in params]))
        )
    }


@dataclass(frozen=True, slots=True)
class GpuHealthRow:
    gpu_id: int
    health: GpuHealth
    reasons: str | None


def write_gpu_health(session: Session, rows: Sequence[GpuHealthRow]) -> None:
    """The GPUs whose health changed (one row per GPU: the last wins)."""
    last = sorted({r.gpu_id: r for r in rows}.values(), key=lambda r: r.gpu_id)
    if not last:
        return
    if session.get_bind().dialect.name == "postgresql":
        for i in range(0, len(last), _CHUNK):
            part = last[i : i + _CHUNK]
            _pg(
                session,
                "UPDATE gpu AS g SET health = v.health, health_reasons = v.reasons "
                "FROM unnest(CAST(%(ids)s AS integer[]), CAST(%(healths)s AS text[]), "
                "CAST(%(reasons)s AS text[])) AS v(id, health, reasons) WHERE g.id = v.id",
                {
                    "ids": [r.gpu_id for r in part],
                    "healths": [r.health.value for r in part],
                    "reasons": [r.reasons for r in part],
                },
            )
        return
    table = Gpu.__table__  # type: ignore[attr-defined]
    session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(health=bindparam("b_health"), health_reasons=bindparam("b_reasons")),
        [{"b_id": r.gpu_id, "b_health": r.health, "b_reasons": r.reasons} for r in last],
    )


@dataclass(frozen=True, slots=True)
class GpuSampleRow:
    gpu_id: int
    utilization_pct: int | None
    memory_used_bytes: int | None
    temperature_c: int | None
    power_mw: int | None
    energy_mj: int | None
    process_count: int | None
    throttle_reasons: str | None
    sampled_at: datetime


_SAMPLES_PG = """
    UPDATE gpu AS g SET
        utilization_pct = v.util, memory_used_bytes = v.mem, temperature_c = v.temp,
        power_mw = v.power, energy_mj = v.energy, process_count = v.procs,
        throttle_reasons = v.throttle, sampled_at = v.at
    FROM unnest(
        CAST(%(ids)s AS integer[]), CAST(%(util)s AS integer[]), CAST(%(mem)s AS bigint[]),
        CAST(%(temp)s AS integer[]), CAST(%(power)s AS bigint[]), CAST(%(energy)s AS bigint[]),
        CAST(%(procs)s AS integer[]), CAST(%(throttle)s AS text[]), CAST(%(at)s AS timestamptz[])
    ) AS v(id, util, mem, temp, power, energy, procs, throttle, at)
    WHERE g.id = v.id
"""


def write_gpu_samples(session: Session, rows: Iterable[GpuSampleRow]) -> int:
    """The latest metrics of each GPU of ``rows`` in one statement (the caller sizes the
    batch: scheduler/api/heartbeats.py flushes 2,000 per transaction); how many."""
    rows = list(rows)
    if not rows:
        return 0
    if session.get_bind().dialect.name == "postgresql":
        _pg(
            session,
            _SAMPLES_PG,
            {
                "ids": [r.gpu_id for r in rows],
                "util": [r.utilization_pct for r in rows],
                "mem": [r.memory_used_bytes for r in rows],
                "temp": [r.temperature_c for r in rows],
                "power": [r.power_mw for r in rows],
                "energy": [r.energy_mj for r in rows],
                "procs": [r.process_count for r in rows],
                "throttle": [r.throttle_reasons for r in rows],
                "at": [r.sampled_at for r in rows],
            },
        )
        return len(rows)
    table = Gpu.__table__  # type: ignore[attr-defined]
    session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(
            utilization_pct=bindparam("b_util"),
            memory_used_bytes=bindparam("b_mem"),
            temperature_c=bindparam("b_temp"),
            power_mw=bindparam("b_power"),
            energy_mj=bindparam("b_energy"),
            process_count=bindparam("b_procs"),
            throttle_reasons=bindparam("b_throttle"),
            sampled_at=bindparam("b_at"),
        ),
        [
            {
                "b_id": r.gpu_id,
                "b_util": r.utilization_pct,
                "b_mem": r.memory_used_bytes,
                "b_temp": r.temperature_c,
                "b_power": r.power_mw,
                "b_energy": r.energy_mj,
                "b_procs": r.process_count,
                "b_throttle": r.throttle_reasons,
                "b_at": r.sampled_at,
            }
            for r in rows
        ],
    )
    return len(rows)


def _pg(session: Session, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One statement straight through psycopg, in the session's transaction: the heartbeat
    path runs a few statements per batch thousands of times a minute, and SQLAlchemy's
    compilation and result machinery cost more CPU than PostgreSQL's work on them."""
    driver = session.connection().connection.driver_connection
    assert driver is not None
    with driver.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


def _held_by_node(session: Session, node_ids: Sequence[int]) -> dict[int, set[int]]:
    """GPU ids held by open allocations, by node (``allocation_gpu.released_at`` is NULL
    exactly while its allocation's workers are not confirmed gone). SQLite's
    ``record_liveness``; PostgreSQL's reads them in its one statement."""
    held: dict[int, set[int]] = {}
    for node_id, gpu_id in session.exec(
        select(AllocationGpu.node_id, AllocationGpu.gpu_id).where(
            col(AllocationGpu.node_id).in_(node_ids), col(AllocationGpu.released_at).is_(None)
        )
    ):
        held.setdefault(node_id, set()).add(gpu_id)
    return held
