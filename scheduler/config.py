"""Settings of the control-plane process: one class, read once, passed in.

Every value can be set by an environment variable with the ``ANDROMEDA_`` prefix, except
``DATABASE_URL`` and ``RAY_ADDRESS`` which keep their conventional names.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RAY_ADDRESS", "ANDROMEDA_RAY_ADDRESS"),
        description="Address of the Ray cluster (host:port of the GCS). None disables the loop.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=1, le=65535)
    scheduler_enabled: bool = True
    scheduler_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_interval_s: int = Field(default=10, ge=1)
    node_lost_after_s: int = Field(default=45, ge=2)
    log_tail_bytes: int = Field(default=64_000, ge=1_000)
