"""Settings of the control-plane process: one class, read once, passed in.

Every value can be set by an environment variable with the ``ANDROMEDA_`` prefix, except
``DATABASE_URL``, which keeps its conventional name. The control plane needs no Ray: each
site's agent runs the work on the site's own Ray cluster.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
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
    heartbeat_interval_s: int = Field(default=10, ge=1)
    node_lost_after_s: int = Field(default=45, ge=2)
    site_report_interval_s: float = Field(
        default=5.0, gt=0, description="how often a site's agent reports when nothing changes"
    )
    package_max_bytes: int = Field(
        default=100 * 2**20, ge=1024, description="largest code package a job may upload"
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
