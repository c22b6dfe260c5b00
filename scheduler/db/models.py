"""Tables of the control plane.

Invariants the rest of the code relies on:
- Times are aware UTC (``UTCDateTime``); durations and usage are integer seconds.
- ``Job.status`` and allocation start/end are written only by
  ``scheduler.services.transitions.transition_job``, in one transaction with the usage rows.
- An allocation is open while ``ended_at`` is NULL; an allocation holds its GPUs until its
  ``released_at`` is set, and a GPU is held by at most one allocation: the hold is copied onto
  ``AllocationGpu.released_at`` in the same transaction, and a partial unique index on
  ``allocation_gpu (gpu_id) WHERE released_at IS NULL`` makes the database refuse a second
  holder whatever the application does.
- ``UsageInterval.key`` (allocation, GPU, interval start) is unique, so a retried write can
  never count a GPU-second twice; and the usage rows of one GPU never overlap in time
  (PostgreSQL: an exclusion constraint; SQLite: a trigger; migration 0006).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, LargeBinary, Text, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import ExcludeConstraint
from sqlmodel import Field, SQLModel

from scheduler.db.types import UTCDateTime, str_enum, utcnow
from scheduler.domain.enums import (
    CommitmentLevel,
    EndReason,
    GpuHealth,
    JobStatus,
    NodeStatus,
    PriorityClass,
    Role,
)


# Default factories are Python functions, not the builtins ``list``/``dict``: pydantic
# inspects a factory's signature each time a row object is built, and a builtin's
# signature is parsed from text (about 0.3 ms each; registering a node builds eight GPUs).
def _empty_list() -> list[Any]:
    return []


def _empty_dict() -> dict[str, Any]:
    return {}


class Provider(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=63, unique=True, index=True)
    display_name: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)


class Agreement(SQLModel, table=True):
    """Versioned contract terms of a provider at one commitment level."""

    __table_args__ = (UniqueConstraint("provider_id", "level", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    provider_id: int = Field(foreign_key="provider.id", index=True)
    level: CommitmentLevel = Field(sa_type=str_enum(CommitmentLevel))
    version: int = Field(default=1, ge=1)
    committed_gpus: int | None = Field(default=None, ge=0)
    committed_gpu_hours_per_month: int | None = Field(default=None, ge=0)
    notice_days: int = Field(default=0, ge=0)
    # How long work on a node of this agreement gets to checkpoint when the provider takes
    # the node back (``andromeda node drain``) or the agreement ends.
    reclaim_notice_s: int = Field(default=300, ge=0, sa_column_kwargs={"server_default": "300"})
    starts_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    ends_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    # Reward rates this agreement sets instead of the policy's ({"api_usage": "0.12"}).
    reward_overrides: dict[str, str] = Field(default_factory=_empty_dict, sa_type=JSON())


class Site(SQLModel, table=True):
    """One Ray cluster at one provider; gangs never cross sites.

    The site's agent pulls the allocations of its site and reports what really runs.
    ``assignments_version`` grows with every change the agent must act on (an allocation
    opened, closed or asked to stop); each allocation records the version of its last such
    change (``Allocation.site_version``). ``applied_version`` is the newest version the
    agent says it has acted on, so an allocation it does not list as active, with a version
    at or below that, is one the site really does not run.
    """

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=63, unique=True, index=True)
    provider_id: int = Field(foreign_key="provider.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    assignments_version: int = Field(default=0, ge=0, sa_type=BigInteger())
    applied_version: int = Field(default=0, ge=0, sa_type=BigInteger())
    last_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    agent_info: dict[str, Any] = Field(default_factory=_empty_dict, sa_type=JSON())


class Node(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=63, unique=True, index=True)
    provider_id: int = Field(foreign_key="provider.id", index=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    agreement_id: int = Field(foreign_key="agreement.id")
    hostname: str = Field(default="", max_length=255)
    status: NodeStatus = Field(default=NodeStatus.ready, sa_type=str_enum(NodeStatus), index=True)
    status_reason: str | None = Field(default=None, max_length=500)
    cpu_count: int = Field(default=0, ge=0)
    memory_bytes: int = Field(default=0, ge=0, sa_type=BigInteger())
    driver_version: str | None = Field(default=None, max_length=64)
    ray_joined: bool = Field(default=False)
    registered_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    last_heartbeat_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), nullable=False
    )
    cuda_driver_version: str | None = Field(default=None, max_length=16)
    # Who set the status by hand ("admin" or "provider"): an admin's cordon or drain is
    # lifted only by an admin.
    status_set_by: str | None = Field(default=None, max_length=16)
    # The agent's clock minus the server's at its last heartbeat, in milliseconds.
    clock_skew_ms: int | None = Field(default=None, sa_type=BigInteger())
    # Set while NVML itself fails on the node (driver gone, access lost): its GPUs are then
    # unknown, which is not the same as lost.
    gpu_source_error: str | None = Field(default=None, max_length=500)
    retired_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)


class Gpu(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    node_id: int = Field(foreign_key="node.id", index=True)
    uuid: str = Field(max_length=96, unique=True)
    index: int = Field(ge=0)
    name: str = Field(max_length=128)
    model: str = Field(max_length=64, index=True)
    memory_bytes: int = Field(ge=0, sa_type=BigInteger())
    health: GpuHealth = Field(default=GpuHealth.unknown, sa_type=str_enum(GpuHealth))
    health_reasons: str | None = Field(default=None, max_length=1000)
    utilization_pct: int | None = None
    memory_used_bytes: int | None = Field(default=None, sa_type=BigInteger())
    temperature_c: int | None = None
    power_mw: int | None = Field(default=None, sa_type=BigInteger())
    energy_mj: int | None = Field(default=None, sa_type=BigInteger())
    sampled_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    process_count: int | None = None
    throttle_reasons: str | None = Field(default=None, max_length=500)
    compute_capability: str | None = Field(default=None, max_length=8)
    pci_bus_id: str | None = Field(default=None, max_length=32)
    serial: str | None = Field(default=None, max_length=64)
    # A MIG-enabled GPU is recorded with its instances but takes no gang work.
    mig_enabled: bool | None = None
    mig_instances: list[dict[str, Any]] = Field(default_factory=_empty_list, sa_type=JSON())


class GpuConflict(SQLModel, table=True):
    """A GPU UUID that a second node (of another provider, or another node of the same one)
    tried to register while the GPU is registered elsewhere. The GPU is never silently
    reassigned: the registration is refused and an admin resolves the conflict."""

    __tablename__ = "gpu_conflict"
    __table_args__ = (UniqueConstraint("gpu_uuid", "claimant_node", "claimant_provider_id"),)

    id: int | None = Field(default=None, primary_key=True)
    gpu_uuid: str = Field(max_length=96, index=True)
    owner_node_id: int = Field(foreign_key="node.id")
    claimant_provider_id: int = Field(foreign_key="provider.id")
    claimant_node: str = Field(max_length=63)
    first_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    last_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    attempts: int = Field(default=1, ge=1)
    resolved_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    resolution: str | None = Field(default=None, max_length=500)


class GpuEvidence(SQLModel, table=True):
    """What one GPU did over one window [start_s, end_s), as its agent measured it: the
    facts a usage row's evidence is drawn from. ``key`` (node, GPU, start_s) is unique, so
    a spool that replays a window twice stores it once."""

    __tablename__ = "gpu_evidence"
    __table_args__ = (Index("ix_gpu_evidence_gpu_start", "gpu_id", "start_s"),)

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=200, unique=True)
    node_id: int = Field(foreign_key="node.id", index=True)
    gpu_id: int = Field(foreign_key="gpu.id")
    start_s: int = Field(sa_type=BigInteger())
    end_s: int = Field(sa_type=BigInteger())
    samples: int = Field(ge=1)
    utilization_pct_avg: int | None = None
    energy_mj: int | None = Field(default=None, sa_type=BigInteger())
    process_seen: bool | None = None
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)


class Job(SQLModel, table=True):
    __table_args__ = (Index("ix_job_queue", "status", "priority", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=63)
    model_name: str = Field(max_length=200, index=True)
    model_version_id: int | None = Field(default=None, foreign_key="model_version.id", index=True)
    owner: str = Field(max_length=100)
    priority_class: PriorityClass = Field(sa_type=str_enum(PriorityClass))
    priority: int
    preemptible: bool
    num_workers: int = Field(ge=1)
    gpus_per_worker: int = Field(ge=1)
    gpu_model: str | None = Field(default=None, max_length=64)
    min_gpu_memory_gb: int | None = None
    max_runtime_s: int | None = None
    entrypoint: str = Field(sa_type=Text())
    env: dict[str, str] = Field(default_factory=_empty_dict, sa_type=JSON())
    checkpoint_uri: str | None = Field(default=None, max_length=1000)
    spec: dict[str, Any] = Field(default_factory=_empty_dict, sa_type=JSON())
    status: JobStatus = Field(default=JobStatus.pending, sa_type=str_enum(JobStatus))
    pending_reason: str | None = Field(default=None, max_length=1000)
    error: str | None = Field(default=None, sa_type=Text())
    attempts: int = Field(default=0, ge=0)
    submitted_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)


class Allocation(SQLModel, table=True):
    """One placement of one job at one site; open while ``ended_at`` is NULL.

    Times, in order: ``started_at`` the decision (the site is asked to start it);
    ``running_at`` when the site reported every worker of the gang running (GPU-seconds
    count from here: waiting for Ray to reserve the bundles is start-up, not credited);
    ``ended_at`` the end the ledger bills up to; ``released_at`` when the site confirmed the
    workers gone. GPUs are held, and never handed out again, until ``released_at``.
    ``stop_requested_at`` / ``stop_deadline_at`` / ``stop_reason`` describe a stop the
    site is carrying out while the allocation is still open (preemption with grace).
    """

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    provider_id: int = Field(foreign_key="provider.id", index=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    started_at: datetime = Field(sa_type=UTCDateTime(), nullable=False)
    running_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    ended_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime(), nullable=True, index=True
    )
    released_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime(), nullable=True, index=True
    )
    end_reason: EndReason | None = Field(default=None, sa_type=str_enum(EndReason))
    error: str | None = Field(default=None, sa_type=Text())
    failed_rank: int | None = Field(default=None, ge=0)
    stop_requested_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    stop_deadline_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    stop_reason: EndReason | None = Field(default=None, sa_type=str_enum(EndReason))
    stop_for_job_id: int | None = None  # the job a preemption stops this allocation for
    # The latest checkpoint the site reported (the marker file the entrypoint touches).
    last_checkpoint_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    site_version: int = Field(default=0, ge=0, sa_type=BigInteger())
    # The ledger holds this allocation's GPU-seconds up to here (the ledger tick meters
    # running work; the close writes the rest).
    metered_until: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)


class AllocationEvent(SQLModel, table=True):
    """What a site reported about an allocation, once: ``key`` is (allocation, event), so a
    report sent again (the agent retries until acknowledged) changes nothing."""

    __tablename__ = "allocation_event"

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=200, unique=True)
    allocation_id: int = Field(foreign_key="allocation.id", index=True)
    kind: str = Field(max_length=32)
    at: datetime = Field(sa_type=UTCDateTime(), nullable=False)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    detail: dict[str, Any] = Field(default_factory=_empty_dict, sa_type=JSON())


class CodePackage(SQLModel, table=True):
    """A job's working directory as uploaded by ``andromeda submit``: a zip, addressed by
    the SHA-256 of its bytes, fetched and verified by the site before the workers start."""

    __tablename__ = "code_package"

    sha256: str = Field(primary_key=True, max_length=64)
    size_bytes: int = Field(ge=0, sa_type=BigInteger())
    data: bytes = Field(sa_type=LargeBinary())
    uploaded_by: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)


class AllocationGpu(SQLModel, table=True):
    """Which GPU of which node serves which worker rank of an allocation, and the terms it
    serves under: the node's agreement and the GPU's model are fixed when the allocation
    opens, so a later re-registration (new agreement, other level) never re-prices it.

    ``released_at`` copies ``Allocation.released_at`` (``transitions.release_allocation``
    writes both): while it is NULL the row holds its GPU, and the partial unique index
    ``ux_allocation_gpu_held`` lets only one row hold a GPU at a time."""

    __tablename__ = "allocation_gpu"
    __table_args__ = (
        UniqueConstraint("allocation_id", "gpu_id"),
        Index(
            "ux_allocation_gpu_held",
            "gpu_id",
            unique=True,
            postgresql_where=text("released_at IS NULL"),
            sqlite_where=text("released_at IS NULL"),
        ),
        # The heartbeat's busy flags: the open rows of a batch's nodes (migration 0008).
        Index(
            "ix_allocation_gpu_open_node",
            "node_id",
            postgresql_where=text("released_at IS NULL"),
            sqlite_where=text("released_at IS NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    allocation_id: int = Field(foreign_key="allocation.id", index=True)
    rank: int = Field(ge=0)
    node_id: int = Field(foreign_key="node.id", index=True)
    gpu_id: int = Field(foreign_key="gpu.id", index=True)
    agreement_id: int = Field(foreign_key="agreement.id")
    gpu_model: str = Field(max_length=64)
    released_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)


class UsageInterval(SQLModel, table=True):
    """The ledger: one GPU of one allocation over [started_at, ended_at), in integer seconds.

    Provider, node, model and level are copied from the moment of use, so a later change to a
    node or agreement never rewrites history.
    """

    __tablename__ = "usage_interval"
    __table_args__ = (
        Index("ix_usage_provider_time", "provider_id", "started_at"),
        Index("ix_usage_start_s", "start_s"),
        # The rows of one GPU never overlap: PostgreSQL refuses it with this constraint;
        # on SQLite a trigger (migration 0006) checks each insert against the row before
        # it, found through ix_usage_gpu_start.
        Index("ix_usage_gpu_start", "gpu_id", "start_s"),
        ExcludeConstraint(
            (text("gpu_id"), "="),
            (text("int8range(start_s, end_s)"), "&&"),
            name="ex_usage_gpu_time",
            using="gist",
        ).ddl_if(dialect="postgresql"),
    )

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=200, unique=True)
    allocation_id: int = Field(foreign_key="allocation.id", index=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    provider_id: int = Field(foreign_key="provider.id")
    site_id: int = Field(foreign_key="site.id")
    agreement_id: int = Field(foreign_key="agreement.id")
    node_id: int = Field(foreign_key="node.id")
    gpu_id: int = Field(foreign_key="gpu.id", index=True)
    gpu_uuid: str = Field(max_length=96)
    gpu_model: str = Field(max_length=64)
    level: CommitmentLevel = Field(sa_type=str_enum(CommitmentLevel))
    started_at: datetime = Field(sa_type=UTCDateTime(), nullable=False)
    ended_at: datetime = Field(sa_type=UTCDateTime(), nullable=False)
    # floor(started_at) and floor(ended_at) in Unix seconds: gpu_seconds == end_s - start_s,
    # and a report clips rows to a window with integer arithmetic in the database.
    start_s: int = Field(sa_type=BigInteger())
    end_s: int = Field(sa_type=BigInteger())
    gpu_seconds: int = Field(ge=0, sa_type=BigInteger())
    # When the row reached the ledger: a statement counts the rows recorded up to its
    # cutoff, so an approved statement recomputes to the same lines ever after.
    recorded_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    # Evidence from the GPU's agent over the row (annotations: filled in as evidence
    # arrives, never changing the GPU-seconds): seconds of the row the evidence covers, the
    # average utilisation, the energy used, whether any compute process was seen.
    evidence_s: int = Field(default=0, ge=0, sa_column_kwargs={"server_default": "0"})
    utilization_pct_avg: int | None = None
    energy_mj: int | None = Field(default=None, sa_type=BigInteger())
    process_seen: bool | None = None


class JobLog(SQLModel, table=True):
    """The tail of one worker's output, kept after the worker is gone."""

    __tablename__ = "job_log"
    __table_args__ = (UniqueConstraint("allocation_id", "rank"),)

    id: int | None = Field(default=None, primary_key=True)
    allocation_id: int = Field(foreign_key="allocation.id", index=True)
    rank: int = Field(ge=0)
    text: str = Field(sa_type=Text())
    captured_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)


class ApiToken(SQLModel, table=True):
    """A bearer token. Only its SHA-256 is stored; the secret is shown once, at creation."""

    __tablename__ = "api_token"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)
    role: Role = Field(sa_type=str_enum(Role))
    provider_id: int | None = Field(default=None, foreign_key="provider.id")
    token_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)
    # A site's registration token: a provider token that registers and reports nodes of
    # this one site only.
    site_id: int | None = Field(default=None, foreign_key="site.id")
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)


class Model(SQLModel, table=True):
    """A model Andromeda trains; revenue is attributed to its versions."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100, unique=True, index=True)
    description: str = Field(default="", max_length=1000)
    created_by: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)


class ModelVersion(SQLModel, table=True):
    """One version of a model; a fine-tune names the version it was tuned from."""

    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="model.id", index=True)
    version: str = Field(max_length=50)
    parent_id: int | None = Field(default=None, foreign_key="model_version.id")
    created_by: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)


class RevenueEvent(SQLModel, table=True):
    """Money a model or a deal brought in. ``key`` is the sender's idempotency key: the same
    key with the same content is recorded once; with other content it is refused (409)."""

    __tablename__ = "revenue_event"
    __table_args__ = (
        Index("ix_revenue_time", "occurred_at"),
        Index("ix_revenue_received", "received_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=200, unique=True)
    stream: str = Field(max_length=32)
    occurred_at: datetime = Field(sa_type=UTCDateTime(), nullable=False)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    amount_micros: int = Field(sa_type=BigInteger())
    currency: str = Field(max_length=3)
    model_version_id: int | None = Field(default=None, foreign_key="model_version.id")
    provider_id: int | None = Field(default=None, foreign_key="provider.id")
    units: int | None = Field(default=None, sa_type=BigInteger())  # API calls, upgrades
    rate_ppm: int | None = None  # a custom development deal's agreed share, in parts per million
    content_hash: str = Field(max_length=64)
    description: str = Field(default="", max_length=500)


class RewardPolicy(SQLModel, table=True):
    """Reward rates, volume-bonus tiers and GPU-model weights, versioned; a version applies
    to the periods that start on or after ``effective_from``."""

    __tablename__ = "reward_policy"

    version: int = Field(primary_key=True)
    effective_from: datetime = Field(sa_type=UTCDateTime(), nullable=False)
    rates: dict[str, str] = Field(default_factory=_empty_dict, sa_type=JSON())
    bonus_tiers: list[dict[str, str]] = Field(default_factory=_empty_list, sa_type=JSON())
    gpu_weights: dict[str, str] = Field(default_factory=_empty_dict, sa_type=JSON())
    ancestor_weight: str = Field(max_length=20)
    note: str = Field(default="", max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)


class Statement(SQLModel, table=True):
    """What a provider delivered and earned in one period. A draft is recomputed from the
    ledger whenever it is read; approval freezes its lines and their content hash (and the
    instant up to which revenue events were taken, ``cutoff_at``); it never changes again."""

    __table_args__ = (UniqueConstraint("provider_id", "period"),)

    id: int | None = Field(default=None, primary_key=True)
    provider_id: int = Field(foreign_key="provider.id", index=True)
    period: str = Field(max_length=20)
    period_start: datetime = Field(sa_type=UTCDateTime(), nullable=False)
    status: str = Field(default="draft", max_length=16)
    policy_version: int
    cutoff_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    approved_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    approved_by: str | None = Field(default=None, max_length=100)
    paid_at: datetime | None = Field(default=None, sa_type=UTCDateTime(), nullable=True)
    paid_by: str | None = Field(default=None, max_length=100)
    payment_reference: str | None = Field(default=None, max_length=200)
    total_micros: int = Field(default=0, sa_type=BigInteger())
    payable_micros: int = Field(default=0, sa_type=BigInteger())
    content_hash: str | None = Field(default=None, max_length=64)
    lines: list[dict[str, Any]] = Field(default_factory=_empty_list, sa_type=JSON())


class StatementAdjustment(SQLModel, table=True):
    """A correction a partner manager enters (GPU-hours invalidated, a dispute settled); it
    lands on the provider's next statement to be approved, as a line of its own."""

    __tablename__ = "statement_adjustment"

    id: int | None = Field(default=None, primary_key=True)
    provider_id: int = Field(foreign_key="provider.id", index=True)
    amount_micros: int = Field(sa_type=BigInteger())
    reason: str = Field(max_length=500)
    created_by: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False)
    statement_id: int | None = Field(default=None, foreign_key="statement.id")


class SchedulerLease(SQLModel, table=True):
    """Which server process runs the scheduler loop (``scheduler/loop/leader.py``): one row
    per loop. ``epoch`` grows by one at every acquisition and fences every write the loop
    makes; the times are the database's clock, never a replica's."""

    __tablename__ = "scheduler_lease"

    name: str = Field(primary_key=True, max_length=63)
    holder: str = Field(default="", max_length=255)  # hostname:pid:random; "" never held
    epoch: int = Field(default=0, ge=0, sa_type=BigInteger())
    acquired_at: datetime = Field(sa_type=UTCDateTime(), nullable=False)
    renewed_at: datetime = Field(sa_type=UTCDateTime(), nullable=False)
    expires_at: datetime = Field(sa_type=UTCDateTime(), nullable=False)
