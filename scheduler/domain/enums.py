"""Named states and levels. Values are the strings stored in the database and shown in the API."""

from __future__ import annotations

from enum import StrEnum


class CommitmentLevel(StrEnum):
    """How firmly a provider lends capacity, strongest first (see docs/ARCHITECTURE.md)."""

    reserved = "reserved"
    committed = "committed"
    spot = "spot"

    @property
    def rank(self) -> int:
        """0 for the strongest level; the policy prefers lower ranks."""
        return _LEVEL_RANK[self]


_LEVEL_RANK = {CommitmentLevel.reserved: 0, CommitmentLevel.committed: 1, CommitmentLevel.spot: 2}


class PriorityClass(StrEnum):
    """Named priority levels; the integer value orders the queue (higher runs first)."""

    critical = "critical"
    high = "high"
    normal = "normal"
    low = "low"

    @property
    def value_int(self) -> int:
        return PRIORITY_VALUES[self]


PRIORITY_VALUES: dict[PriorityClass, int] = {
    PriorityClass.critical: 1000,
    PriorityClass.high: 100,
    PriorityClass.normal: 10,
    PriorityClass.low: 1,
}


class NodeStatus(StrEnum):
    ready = "ready"
    draining = "draining"
    cordoned = "cordoned"
    lost = "lost"
    retired = "retired"  # removed for good (`andromeda node remove`); its history is kept


class GpuHealth(StrEnum):
    ok = "ok"
    degraded = "degraded"
    failed = "failed"
    unknown = "unknown"


class JobStatus(StrEnum):
    pending = "pending"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


class EndReason(StrEnum):
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"
    preempted = "preempted"
    node_lost = "node_lost"
    provider_reclaim = "provider_reclaim"
    timeout = "timeout"


class Role(StrEnum):
    admin = "admin"
    engineer = "engineer"
    provider = "provider"
    partner_manager = "partner_manager"
