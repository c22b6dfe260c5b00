"""Request and response bodies of the REST API (``/v1``), shared by the server, the CLI and
the agent so both ends of a call validate the same shapes."""

from __future__ import annotations

from datetime import datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from scheduler.domain.enums import (
    CommitmentLevel,
    EndReason,
    GpuHealth,
    JobStatus,
    NodeStatus,
    PriorityClass,
    Role,
)
from scheduler.domain.jobspec import NAME_RE
from scheduler.domain.limits import INT32_MAX, INT64_MAX, CleanText


class _In(CleanText):
    model_config = ConfigDict(extra="forbid")


# --- providers, agreements, tokens ---------------------------------------------------------
class ProviderCreate(_In):
    name: str = Field(pattern=NAME_RE)
    display_name: str | None = Field(default=None, max_length=200)


class ProviderPublic(BaseModel):
    name: str
    display_name: str
    created_at: datetime


class AgreementCreate(_In):
    level: CommitmentLevel
    committed_gpus: int | None = Field(default=None, ge=0, le=INT32_MAX)
    committed_gpu_hours_per_month: int | None = Field(default=None, ge=0, le=INT32_MAX)
    notice_days: int = Field(default=0, ge=0, le=3650)
    starts_at: AwareDatetime | None = Field(default=None, description="default: now")
    ends_at: AwareDatetime | None = None


class AgreementPublic(BaseModel):
    id: int
    provider: str
    level: CommitmentLevel
    version: int
    committed_gpus: int | None
    committed_gpu_hours_per_month: int | None
    notice_days: int
    starts_at: datetime
    ends_at: datetime | None


class TokenCreate(_In):
    name: str = Field(min_length=1, max_length=100)
    role: Role
    provider: str | None = None


class TokenPublic(BaseModel):
    id: int
    name: str
    role: Role
    provider: str | None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="the secret; shown only once")


# --- nodes -----------------------------------------------------------------------------------
class GpuReport(_In):
    uuid: str = Field(min_length=4, max_length=96)
    index: int = Field(ge=0, le=255)
    name: str = Field(min_length=1, max_length=128)
    memory_total_bytes: int = Field(gt=0, le=INT64_MAX)


class NodeRegister(_In):
    name: str = Field(pattern=NAME_RE, description="unique node name; also its Ray label")
    hostname: str = Field(default="", max_length=255)
    level: CommitmentLevel | None = Field(
        default=None, description="commitment level; may be omitted if the provider has one"
    )
    cpu_count: int = Field(default=0, ge=0, le=INT32_MAX)
    memory_bytes: int = Field(default=0, ge=0, le=INT64_MAX)
    driver_version: str | None = Field(default=None, max_length=64)
    gpus: list[GpuReport] = Field(min_length=1, max_length=64)


class GpuSampleIn(_In):
    uuid: str = Field(min_length=4, max_length=96)
    health: GpuHealth = GpuHealth.unknown
    health_reasons: list[str] = Field(default_factory=list, max_length=20)
    utilization_pct: int | None = Field(default=None, ge=0, le=100)
    memory_used_bytes: int | None = Field(default=None, ge=0, le=INT64_MAX)
    temperature_c: int | None = Field(default=None, ge=-50, le=200)
    power_mw: int | None = Field(default=None, ge=0, le=INT64_MAX)
    energy_mj: int | None = Field(default=None, ge=0, le=INT64_MAX)


class Heartbeat(_In):
    ray_joined: bool = False
    gpus: list[GpuSampleIn] = Field(default_factory=list, max_length=64)


class GpuPublic(BaseModel):
    uuid: str
    index: int
    model: str
    memory_bytes: int
    health: GpuHealth
    utilization_pct: int | None
    busy: bool = Field(description="held by an open allocation")


class NodePublic(BaseModel):
    name: str
    provider: str
    level: CommitmentLevel
    status: NodeStatus
    status_reason: str | None
    hostname: str
    ray_joined: bool
    last_heartbeat_at: datetime
    gpus: list[GpuPublic]


class NodeRegistered(BaseModel):
    node: NodePublic
    heartbeat_interval_s: int
    node_lost_after_s: int
    ray_labels: dict[str, str]


class NodeStatusChange(_In):
    status: NodeStatus = Field(description="ready, draining or cordoned")
    reason: str | None = Field(default=None, max_length=500)


# --- jobs --------------------------------------------------------------------------------------
class WorkerPublic(BaseModel):
    rank: int
    node: str
    gpus: list[str]


class AllocationPublic(BaseModel):
    id: int
    provider: str
    started_at: datetime
    ended_at: datetime | None
    end_reason: EndReason | None
    error: str | None
    gpu_seconds: int | None
    workers: list[WorkerPublic]


class JobPublic(BaseModel):
    id: int
    name: str
    model: str
    owner: str
    priority: PriorityClass
    preemptible: bool
    workers: int
    gpus_per_worker: int
    gpu_model: str | None
    status: JobStatus
    pending_reason: str | None
    error: str | None
    attempts: int
    submitted_at: datetime
    finished_at: datetime | None


class JobDetail(JobPublic):
    entrypoint: str
    allocations: list[AllocationPublic]


class JobLogs(BaseModel):
    job_id: int
    allocation_id: int | None
    live: bool
    logs: dict[int, str] = Field(description="rank -> tail of the worker's output")


# --- usage ---------------------------------------------------------------------------------------
class UsageRow(BaseModel):
    provider: str
    level: CommitmentLevel
    gpu_model: str
    gpu_seconds: int
    gpu_hours: str = Field(description="gpu_seconds / 3600, exact decimal to 4 places")


class UsageReport(BaseModel):
    start: datetime
    end: datetime
    rows: list[UsageRow]
    total_gpu_seconds: int
