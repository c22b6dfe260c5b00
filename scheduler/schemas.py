"""Request and response bodies of the REST API (``/v1``), shared by the server, the CLI and
the agent so both ends of a call validate the same shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

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
from scheduler.domain.limits import INT32_MAX, INT64_MAX, CleanText, reject_nul_in


class _In(CleanText):
    model_config = ConfigDict(extra="forbid")


# Bounded text of list items and mapping keys and values (docs/OPERATIONS.md, Limits).
Reason = Annotated[str, Field(max_length=200)]
ShortKey = Annotated[str, Field(max_length=64)]
ShortValue = Annotated[str, Field(max_length=500)]
DecimalText = Annotated[str, Field(max_length=32)]
HostName = Annotated[str, Field(max_length=255)]


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
    provider: str | None = Field(default=None, max_length=63)
    site: str | None = Field(
        default=None,
        pattern=NAME_RE,
        description="provider tokens: bind the token to this site (a site's registration "
        "token: it registers and reports that site's nodes only)",
    )


class TokenPublic(BaseModel):
    id: int
    name: str
    role: Role
    provider: str | None
    site: str | None = None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="the secret; shown only once")


# --- nodes -----------------------------------------------------------------------------------
class MigInstanceReport(_In):
    uuid: str = Field(min_length=4, max_length=96)
    profile: str = Field(min_length=1, max_length=64)
    memory_total_bytes: int | None = Field(default=None, ge=0, le=INT64_MAX)


class GpuReport(_In):
    uuid: str = Field(min_length=4, max_length=96)
    index: int = Field(ge=0, le=255)
    name: str = Field(min_length=1, max_length=128)
    memory_total_bytes: int = Field(gt=0, le=INT64_MAX)
    compute_capability: str | None = Field(default=None, pattern=r"^\d{1,2}\.\d{1,2}$")
    pci_bus_id: str | None = Field(default=None, max_length=32)
    serial: str | None = Field(default=None, max_length=64)
    mig_enabled: bool | None = Field(
        default=None,
        description="a MIG-enabled GPU is recorded with its instances but takes no gang work "
        "(gangs are placed on whole GPUs); see docs/AGENT.md",
    )
    mig_instances: list[MigInstanceReport] = Field(default_factory=list, max_length=7)


class NodeRegister(_In):
    name: str = Field(pattern=NAME_RE, description="unique node name; also its Ray label")
    site: str | None = Field(
        default=None,
        pattern=NAME_RE,
        description="the site (Ray cluster) the node belongs to; may be omitted if the "
        "provider has one site",
    )
    hostname: str = Field(default="", max_length=255)
    level: CommitmentLevel | None = Field(
        default=None, description="commitment level; may be omitted if the provider has one"
    )
    cpu_count: int = Field(default=0, ge=0, le=INT32_MAX)
    memory_bytes: int = Field(default=0, ge=0, le=INT64_MAX)
    driver_version: str | None = Field(default=None, max_length=64)
    cuda_driver_version: str | None = Field(default=None, max_length=16)
    gpus: list[GpuReport] = Field(min_length=1, max_length=64)


class GpuSampleIn(_In, nul_check=False):  # Heartbeat checks its text
    uuid: str = Field(min_length=4, max_length=96)
    health: GpuHealth = GpuHealth.unknown
    health_reasons: list[Reason] = Field(
        default_factory=list, max_length=20, description="at most 20, of 200 characters each"
    )
    utilization_pct: int | None = Field(default=None, ge=0, le=100)
    memory_used_bytes: int | None = Field(default=None, ge=0, le=INT64_MAX)
    temperature_c: int | None = Field(default=None, ge=-50, le=200)
    power_mw: int | None = Field(default=None, ge=0, le=INT64_MAX)
    energy_mj: int | None = Field(default=None, ge=0, le=INT64_MAX)
    process_count: int | None = Field(default=None, ge=0, le=4096)
    throttle_reasons: list[ShortKey] | None = Field(default=None, max_length=16)


EVIDENCE_WINDOW_S = 60
"""Evidence windows are aligned to this many seconds of the server's clock."""


class EvidenceWindow(_In, nul_check=False):  # its holders check its text
    """What one GPU did over [start_s, end_s) (Unix seconds, server clock as the agent
    estimates it), aggregated by the agent from its samples. Keyed by (node, GPU,
    start_s): sending a window twice stores it once."""

    uuid: str = Field(min_length=4, max_length=96)
    start_s: int = Field(ge=0, le=INT64_MAX)
    end_s: int = Field(ge=0, le=INT64_MAX)
    samples: int = Field(ge=1, le=100_000)
    utilization_pct_avg: int | None = Field(default=None, ge=0, le=100)
    energy_mj: int | None = Field(
        default=None,
        ge=0,
        le=INT64_MAX,
        description="energy used in the window; a counter "
        "reset inside it is skipped over, never counted as negative energy",
    )
    process_seen: bool | None = Field(
        default=None,
        description="a compute process ran on the GPU during the window; "
        "None when NVML could not list processes",
    )

    @field_validator("end_s")
    @classmethod
    def _ordered(cls, end_s: int, info: Any) -> int:
        start = info.data.get("start_s")
        if start is not None and not start < end_s <= start + 3600:
            raise ValueError("end_s must be after start_s and at most an hour later")
        return end_s


class Heartbeat(_In):
    gpus: list[GpuSampleIn] = Field(default_factory=list, max_length=64)
    sent_at: AwareDatetime | None = Field(
        default=None, description="the agent's clock when it sent this; used to detect skew"
    )
    gpu_source_error: str | None = Field(
        default=None,
        max_length=500,
        description="set when NVML itself fails on the node (driver gone, access lost): "
        "the node's GPUs are then unknown, not lost",
    )
    evidence: list[EvidenceWindow] = Field(default_factory=list, max_length=2048)

    @model_validator(mode="after")
    def _no_nul_in_samples(self) -> Heartbeat:
        reject_nul_in(self.gpus, ("uuid", "health_reasons", "throttle_reasons"), "gpus")
        reject_nul_in(self.evidence, ("uuid",), "evidence")
        return self


class EvidenceBatch(_In):
    """Evidence a node's spool replays after an outage, oldest first."""

    windows: list[EvidenceWindow] = Field(min_length=1, max_length=20_000)

    @model_validator(mode="after")
    def _no_nul_in_windows(self) -> EvidenceBatch:
        reject_nul_in(self.windows, ("uuid",), "windows")
        return self


class EvidenceAck(BaseModel):
    stored: int = Field(description="windows new to the server")
    duplicates: int = Field(description="windows it already had (a replay of a replay)")
    credited_gpu_seconds: int = Field(
        description="GPU-seconds given back to allocations that this evidence shows held "
        "their GPUs while the node was out of contact"
    )


class GpuPublic(BaseModel):
    uuid: str
    index: int
    model: str
    memory_bytes: int
    health: GpuHealth
    health_reasons: str | None = None
    utilization_pct: int | None
    process_count: int | None = None
    mig_enabled: bool | None = Field(default=None, description="MIG-enabled GPUs take no gang work")
    busy: bool = Field(description="held by an open allocation")


class NodePublic(BaseModel):
    name: str
    provider: str
    site: str
    level: CommitmentLevel
    status: NodeStatus
    status_reason: str | None
    hostname: str
    ray_joined: bool
    last_heartbeat_at: datetime
    gpus: list[GpuPublic]
    status_set_by: str | None = Field(
        default=None, description="who set the status by hand: admin or provider"
    )
    clock_skew_ms: int | None = Field(
        default=None, description="the agent's clock minus the server's at its last heartbeat"
    )
    gpu_source_error: str | None = Field(
        default=None, description="set while NVML itself fails on the node"
    )


class HeartbeatAck(BaseModel):
    """The answer to a heartbeat: what the agent acts on, and nothing it does not (the
    node's full view is ``GET /v1/nodes/{name}``). Sent once the heartbeat's liveness and
    evidence are committed."""

    name: str
    status: NodeStatus
    status_reason: str | None = None
    status_set_by: str | None = Field(
        default=None, description="who set the status by hand: admin or provider"
    )
    busy: list[str] = Field(
        default_factory=list, description="UUIDs of the node's GPUs held by open allocations"
    )
    clock_skew_ms: int | None = Field(
        default=None, description="the agent's clock minus the server's at this heartbeat"
    )
    evidence_stored: int = Field(default=0, description="windows of this heartbeat new to us")


SITE_HEARTBEATS_MAX = 1_000
"""A site's batch of heartbeats: at most this many nodes."""


class NodeHeartbeat(_In):
    name: str = Field(pattern=NAME_RE, description="the node the heartbeat is of")
    heartbeat: Heartbeat


class SiteHeartbeats(_In):
    """Heartbeats of several nodes of one site in one request (a site's relay batches its
    hosts' heartbeats): each is checked, recorded and answered as if sent alone."""

    nodes: list[NodeHeartbeat] = Field(min_length=1, max_length=SITE_HEARTBEATS_MAX)


class NodeHeartbeatAnswer(BaseModel):
    name: str
    status_code: int = Field(description="what the node's own heartbeat would have been answered")
    ack: HeartbeatAck | None = Field(default=None, description="with 200")
    detail: Any = Field(default=None, description="otherwise: why it was refused")


class SiteHeartbeatsAck(BaseModel):
    nodes: list[NodeHeartbeatAnswer] = Field(description="in the order of the request")


class GpuConflictPublic(BaseModel):
    id: int
    gpu_uuid: str
    registered_on: str = Field(description="the node the GPU is registered on")
    claimant_provider: str
    claimant_node: str
    attempts: int
    first_seen_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    resolution: str | None


class GpuConflictResolve(_In):
    release: bool = Field(
        description="true: take the GPU off the node it is registered on (it must hold no "
        "work) so the claimant's next registration gets it; false: dismiss the claim"
    )
    note: str | None = Field(default=None, max_length=500)


class NodeRegistered(BaseModel):
    node: NodePublic
    heartbeat_interval_s: int
    node_lost_after_s: int
    ray_labels: dict[str, str]


class NodeStatusChange(_In):
    status: NodeStatus = Field(description="ready, draining or cordoned")
    reason: str | None = Field(default=None, max_length=500)
    notice_s: int | None = Field(
        default=None,
        ge=0,
        le=7 * 86400,
        description=(
            "draining: the seconds running work gets to checkpoint before it is moved "
            "(default: the agreement's reclaim notice)"
        ),
    )
    let_finish: bool = Field(
        default=False, description="draining: let running work finish instead of moving it"
    )


# --- jobs --------------------------------------------------------------------------------------
class WorkerPublic(BaseModel):
    rank: int
    node: str
    gpus: list[str]


class AllocationPublic(BaseModel):
    id: int
    provider: str
    site: str
    phase: Literal["starting", "running", "stopping", "ended"] = Field(
        description="starting: the site is reserving or launching; running: every worker "
        "runs (GPU-seconds count from running_at); stopping: asked to stop; ended"
    )
    started_at: datetime
    running_at: datetime | None
    ended_at: datetime | None
    end_reason: EndReason | None
    error: str | None
    failed_rank: int | None
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
    idle_gpu_seconds: int = Field(
        default=0, description="of gpu_seconds, those whose evidence saw no compute process"
    )
    unverified_gpu_seconds: int = Field(
        default=0, description="of gpu_seconds, those with no evidence from the GPU's agent"
    )
    allocation_id: int | None = Field(default=None, description="by=allocation only")
    job: str | None = Field(default=None, description="by=allocation only: the job's name")
    utilization_pct_avg: int | None = Field(
        default=None, description="by=allocation only: evidence-weighted average utilisation"
    )
    energy_mj: int | None = Field(default=None, description="by=allocation only")


class UsageReport(BaseModel):
    start: datetime
    end: datetime
    rows: list[UsageRow]
    total_gpu_seconds: int
    complete_up_to: datetime = Field(
        description="every GPU-second before this instant is in the report; running "
        "allocations are metered by the ledger tick, at least hourly"
    )


# --- sites: the pull protocol between the control plane and each site's agent ---------------
class SiteCreate(_In):
    name: str = Field(pattern=NAME_RE, description="unique site name")


class SitePublic(BaseModel):
    name: str
    provider: str
    assignments_version: int
    applied_version: int
    last_seen_at: datetime | None
    nodes: int


class WorkerAssignment(BaseModel):
    rank: int
    node: str
    gpu_uuids: list[str]
    local_rank: int


class Assignment(BaseModel):
    """One allocation a site must run (``action: run``) or stop (``action: stop``)."""

    allocation_id: int
    job_id: int
    job_name: str
    action: Literal["run", "stop"]
    entrypoint: str
    env: dict[str, str]
    workers: list[WorkerAssignment]
    package_sha256: str | None = Field(description="code to fetch from /v1/packages")
    working_dir: str | None = Field(description="a directory on the site's hosts")
    checkpoint_uri: str | None
    stop_deadline_at: datetime | None = None
    stop_reason: EndReason | None = None


class SiteAssignments(BaseModel):
    site: str
    version: int
    assignments: list[Assignment]
    report_interval_s: float


MAX_LOG_CHARS = 64_000


class SiteEvent(_In):
    """A fact about one allocation, sent until acknowledged; its key makes a resend harmless.

    - ``started``: every worker of the gang runs (``at``: when the last one started);
    - ``finished``: every worker exited by itself (``exit_codes`` per rank);
    - ``lost``: workers died without exiting (their node or process died) or Ray never
      placed the gang (``error`` says which);
    - ``stopped``: the workers were stopped as asked and the resources freed.
    """

    allocation_id: int = Field(ge=1, le=INT32_MAX)
    kind: Literal["started", "finished", "lost", "stopped"]
    at: AwareDatetime
    exit_codes: dict[int, int] = Field(default_factory=dict, max_length=1024)
    error: str | None = Field(default=None, max_length=2000)
    failed_rank: int | None = Field(default=None, ge=0, description="the rank that failed first")
    logs: dict[int, str] = Field(default_factory=dict, max_length=1024)

    @property
    def key(self) -> str:
        return f"{self.allocation_id}:{self.kind}"

    @field_validator("logs", mode="before")
    @classmethod
    def _printable_logs(cls, v: Any) -> Any:
        return _clean_tails(v)


class SiteReport(_In):
    """What a site's agent sees: events, the allocations it holds, the Ray nodes alive."""

    applied_version: int = Field(ge=0, description="the assignments version acted on")
    active: list[int] = Field(
        default_factory=list, max_length=100_000, description="allocations it holds"
    )
    events: list[SiteEvent] = Field(default_factory=list, max_length=10_000)
    ray_nodes: list[HostName] | None = Field(
        default=None, max_length=100_000, description="node names Ray reports alive"
    )
    logs: dict[int, dict[int, str]] = Field(
        default_factory=dict, max_length=10_000, description="allocation -> rank -> live tail"
    )
    agent: dict[ShortKey, ShortValue] = Field(default_factory=dict, max_length=20)
    checkpoints: dict[int, AwareDatetime] = Field(
        default_factory=dict,
        max_length=100_000,
        description="allocation -> when its rank 0 last touched ANDROMEDA_CHECKPOINT_MARKER",
    )

    @field_validator("logs", mode="before")
    @classmethod
    def _printable_logs(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: _clean_tails(tails) for k, tails in v.items()}
        return v


def _clean_tails(v: Any) -> Any:
    """A program's output is what it is: NUL made printable (PostgreSQL text cannot hold it)
    and only the last ``MAX_LOG_CHARS`` kept, never a reason to refuse a site's report."""
    if not isinstance(v, dict):
        return v
    return {
        rank: text[-MAX_LOG_CHARS:].replace("\x00", "\ufffd") if isinstance(text, str) else text
        for rank, text in v.items()
    }


class SiteReportResult(BaseModel):
    accepted: list[str] = Field(description="event keys recorded now or before")
    version: int


# --- models, revenue, statements --------------------------------------------------------
class ModelCreate(_In):
    name: str = Field(min_length=1, max_length=100, description="lower-case model name")
    description: str = Field(default="", max_length=1000)


class ModelVersionCreate(_In):
    version: str = Field(min_length=1, max_length=50)
    parent: str | None = Field(
        default=None, max_length=151, description="name:version this one was fine-tuned from"
    )


class ModelVersionPublic(BaseModel):
    reference: str = Field(description="name:version, as a job spec names it")
    version: str
    parent: str | None
    created_at: datetime


class ModelPublic(BaseModel):
    name: str
    description: str
    created_at: datetime
    versions: list[ModelVersionPublic]


class VersionHoursRow(BaseModel):
    provider: str
    level: CommitmentLevel
    gpu_model: str
    job_status: JobStatus
    gpu_seconds: int
    gpu_hours: str
    counts_for_revenue: bool


class VersionHours(BaseModel):
    reference: str
    ancestors: list[str] = Field(description="parent first")
    rows: list[VersionHoursRow]


class RevenueEventIn(_In):
    """One revenue event. ``amount`` is decimal text in the settlement currency."""

    key: str = Field(min_length=1, max_length=200, description="idempotency key")
    stream: Literal[
        "api_usage",
        "subscription",
        "upgrade",
        "licence",
        "consulting",
        "custom_dev",
        "dedicated_capacity",
    ]
    occurred_at: AwareDatetime
    amount: str = Field(min_length=1, max_length=32, description='decimal text, e.g. "12.34"')
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    model: str | None = Field(default=None, max_length=151, description="name:version")
    provider: str | None = Field(
        default=None, max_length=63, description="sourcing / facilitating / buying provider"
    )
    calls: int | None = Field(default=None, ge=0, le=INT64_MAX, description="api_usage")
    upgrades: int | None = Field(default=None, ge=1, le=INT32_MAX, description="upgrade")
    rate: str | None = Field(default=None, max_length=20, description="custom_dev: 0.05-0.10")
    description: str = Field(default="", max_length=500)


class RevenueItemResult(BaseModel):
    index: int
    key: str | None
    status: Literal["recorded", "duplicate", "conflict", "invalid"]
    detail: str | None = None
    id: int | None = None


class RevenueBatchResult(BaseModel):
    recorded: int
    duplicates: int
    rejected: int
    items: list[RevenueItemResult]


class AdjustmentCreate(_In):
    amount: str = Field(min_length=1, max_length=32, description="decimal text; negative ok")
    reason: str = Field(min_length=1, max_length=500)


class AdjustmentPublic(BaseModel):
    id: int
    provider: str
    amount_micros: int
    reason: str
    created_by: str
    created_at: datetime
    statement_period: str | None


class StatementLine(BaseModel):
    line: int
    kind: Literal[
        "usage", "commitment", "revenue_share", "volume_bonus", "discount", "adjustment", "carry"
    ]
    description: str
    amount_micros: int = Field(description="added to the total (0 for what only informs)")
    amount: str
    detail: dict[str, Any] = Field(default_factory=dict)


class StatementPublic(BaseModel):
    provider: str
    period: str
    period_start: datetime
    period_end: datetime
    status: Literal["draft", "approved", "paid"]
    currency: str
    policy_version: int
    cutoff_at: datetime | None = Field(description="revenue events received up to here")
    ledger_complete_up_to: datetime
    lines: list[StatementLine]
    total_micros: int
    total: str
    payable_micros: int = Field(description="the total down to a whole cent; the rest carries")
    payable: str
    content_hash: str
    approved_at: datetime | None
    approved_by: str | None
    paid_at: datetime | None
    payment_reference: str | None


class StatementExplanation(BaseModel):
    provider: str
    period: str
    line: StatementLine
    derivation: list[str] = Field(description="the computation, step by step")
    rows: list[dict[str, Any]] = Field(description="the rows behind it (the first ones)")
    rows_total: int


class StatementVerification(BaseModel):
    provider: str
    period: str
    stored_hash: str
    recomputed_hash: str
    matches: bool


class PaymentIn(_In):
    payment_reference: str = Field(min_length=1, max_length=200)


class RewardPolicyIn(_In):
    effective_from: AwareDatetime
    rates: dict[ShortKey, DecimalText] = Field(default_factory=dict, max_length=50)
    bonus_tiers: list[Annotated[dict[ShortKey, DecimalText], Field(max_length=10)]] | None = Field(
        default=None, max_length=50
    )
    gpu_weights: dict[ShortKey, DecimalText] | None = Field(default=None, max_length=200)
    ancestor_weight: str | None = Field(default=None, max_length=20)
    note: str = Field(default="", max_length=500)


class RewardPolicyPublic(BaseModel):
    version: int
    effective_from: datetime
    rates: dict[str, str]
    bonus_tiers: list[dict[str, str]]
    gpu_weights: dict[str, str]
    ancestor_weight: str
    note: str
