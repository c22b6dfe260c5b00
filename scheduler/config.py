"""Settings of the control-plane process: one class, read once, passed in.

Every value can be set by an environment variable with the ``ANDROMEDA_`` prefix, except
``DATABASE_URL``, which keeps its conventional name. The control plane needs no Ray: each
site's agent runs the work on the site's own Ray cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.domain.periods import Grain

DEFAULT_DATA_DIR = Path.home() / ".andromeda"


def default_database_url(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    return f"sqlite:///{data_dir / 'andromeda.db'}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANDROMEDA_", extra="ignore")

    database_url: str = Field(
        default_factory=default_database_url,
        validation_alias=AliasChoices("DATABASE_URL", "ANDROMEDA_DATABASE_URL"),
        description="SQLAlchemy URL; sqlite:///path (embedded default) or postgresql+psycopg://...",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=1, le=65535)
    scheduler_enabled: bool = True
    scheduler_interval_s: float = Field(default=2.0, gt=0)
    leader_lease_s: float = Field(
        default=6.0,
        ge=0.5,
        le=300,
        description="the scheduler lease (two replicas, one leader): a leader that stops "
        "renewing it is replaced this long after its last renewal",
    )
    leader_renew_s: float = Field(
        default=2.0,
        gt=0,
        description="how often the leader renews its lease and a standby tries to take it",
    )
    heartbeat_interval_s: int = Field(default=10, ge=1)
    heartbeat_batch_max: int = Field(
        default=1000, ge=1, le=100_000, description="most heartbeats written in one transaction"
    )
    heartbeat_batch_wait_s: float = Field(
        default=0.005,
        ge=0,
        le=1,
        description="how long the heartbeat writer waits for more heartbeats to join a batch",
    )
    heartbeat_auth_cache_s: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="how long a heartbeat token check is cached (a revoked token keeps "
        "heartbeating at most this long)",
    )
    heartbeat_sample_flush_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="how often the GPUs' newest metrics (utilisation, power, ...) are written; "
        "liveness, health and evidence are written before each heartbeat is answered",
    )
    heartbeat_directory_refresh_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="how often the heartbeat path re-reads the nodes it checks heartbeats "
        "against (what another replica changed is seen within this)",
    )
    heartbeat_fast_path: bool = Field(
        default=True,
        description="serve heartbeats beside FastAPI's router (scheduler/api/fastpath.py); "
        "off, the FastAPI route serves them (the benchmark's baseline)",
    )
    node_lost_after_s: int = Field(default=45, ge=2)
    site_report_interval_s: float = Field(
        default=5.0, gt=0, description="how often a site's agent reports when nothing changes"
    )
    package_max_bytes: int = Field(
        default=100 * 2**20, ge=1024, description="largest code package a job may upload"
    )
    max_body_bytes: int = Field(
        default=2**20,
        ge=1024,
        description="largest request body (413 above it); code packages have "
        "package_max_bytes, a site's report (with its workers' output tails) a larger "
        "limit of its own (docs/OPERATIONS.md, Limits)",
    )
    period: Grain = Field(
        default=Grain.month,
        description="accounting period of statements (month; day, hour, minute for demos)",
    )
    ledger_tick_s: int = Field(
        default=3600,
        ge=1,
        le=3600,
        description="running allocations are metered at least this often (and at every "
        "period boundary)",
    )
    currency: str = Field(
        default="USD", pattern=r"^[A-Z]{3}$", description="the settlement currency"
    )
    policy_config: Path | None = Field(
        default=None,
        description="YAML or JSON file of placement policy settings (docs/POLICY.md); "
        "default: the built-in policy",
    )

    @model_validator(mode="after")
    def _renew_well_inside_the_lease(self) -> Self:
        if self.leader_renew_s * 2 > self.leader_lease_s:
            raise ValueError(
                f"leader_renew_s ({self.leader_renew_s}) must be at most half of "
                f"leader_lease_s ({self.leader_lease_s}), so that one late renewal does not "
                "lose the lease"
            )
        return self
