"""The job spec an engineer writes (YAML or JSON), validated before anything is stored.

Validation here covers what the spec alone can tell; checks against the fleet (a worker asking
for more GPUs than any node has) happen in ``scheduler.services.jobs`` at submission.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from scheduler.domain.enums import PriorityClass
from scheduler.domain.limits import CleanText

NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_RUNTIME_S = 30 * 86400
# Size limits of a spec (docs/OPERATIONS.md, Limits): a 422 names the field over them.
MAX_ENTRYPOINT_CHARS = 10_000
MAX_ENV_VARS = 100
MAX_ENV_NAME_CHARS = 128
MAX_ENV_VALUE_CHARS = 4096
EnvName = Annotated[str, Field(max_length=MAX_ENV_NAME_CHARS)]
EnvValue = Annotated[str, Field(max_length=MAX_ENV_VALUE_CHARS)]


def parse_duration(value: int | str) -> int:
    """``3600``, ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"`` -> whole seconds."""
    if isinstance(value, bool):
        raise ValueError("expected seconds or a duration like 90s, 15m, 2h")
    if isinstance(value, int):
        return value
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration: use seconds or 90s, 15m, 2h, 1d")
    return int(match.group(1)) * _UNITS[match.group(2)]


class GpuConstraint(CleanText):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, max_length=64, description="GPU model, e.g. H100 or H100-80GB"
    )
    min_memory_gb: int | None = Field(default=None, ge=1, le=4096)


class JobSpec(CleanText):
    """A gang: ``workers`` x ``gpus_per_worker`` GPUs, all in one provider."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, Field(pattern=NAME_RE, description="lower-case DNS label")]
    model: str = Field(
        min_length=3,
        max_length=151,
        description="the registered model version this job trains, name:version "
        "(`andromeda model create`); revenue of that version is attributed to its GPU-hours",
    )
    entrypoint: str = Field(min_length=1, max_length=MAX_ENTRYPOINT_CHARS)
    priority: PriorityClass = PriorityClass.normal
    preemptible: bool = True
    workers: int = Field(default=1, ge=1, le=1024)
    gpus_per_worker: int = Field(default=1, ge=1, le=64)
    gpu: GpuConstraint = Field(default_factory=GpuConstraint)
    max_runtime: int | None = Field(
        default=None, description="seconds, or a duration like 30m; the job is stopped after it"
    )
    package: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the job's code package (`andromeda submit` packs and uploads "
        "the YAML's working_dir and sets this); the workers start in it",
    )
    working_dir: str | None = Field(
        default=None,
        max_length=1000,
        description="an absolute directory that already exists on the site's hosts (code "
        "baked into their image); without it or a package, the workers start in a scratch "
        "directory",
    )
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict,
        max_length=MAX_ENV_VARS,
        description=f"environment variables of the workers: at most {MAX_ENV_VARS}, names of "
        f"up to {MAX_ENV_NAME_CHARS} characters, values of up to {MAX_ENV_VALUE_CHARS}",
    )
    checkpoint: str | None = Field(
        default=None,
        max_length=1000,
        description="where the job keeps its checkpoints (ANDROMEDA_CHECKPOINT; default: a "
        "folder of the site); naming one also says the job checkpoints",
    )
    checkpointing: bool = Field(
        default=False,
        description="the job saves checkpoints to ANDROMEDA_CHECKPOINT and resumes from them: "
        "critical and high work that is also preemptible may then run on spot capacity",
    )

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("max_runtime", mode="before")
    @classmethod
    def _parse_runtime(cls, v: Any) -> Any:
        if v is None:
            return None
        seconds = parse_duration(v)
        if not 1 <= seconds <= MAX_RUNTIME_S:
            raise ValueError(f"must be between 1 second and {MAX_RUNTIME_S // 86400} days")
        return seconds

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if key in RESERVED_ENV or key.startswith(RESERVED_PREFIXES):
                raise ValueError(f"{key} is set by the scheduler and cannot be overridden")
        return v

    @field_validator("working_dir")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("must be an absolute path on the site's hosts")
        return v

    @model_validator(mode="after")
    def _one_code_source(self) -> JobSpec:
        if self.package and self.working_dir:
            raise ValueError("give package or working_dir, not both")
        return self

    @property
    def total_gpus(self) -> int:
        return self.workers * self.gpus_per_worker


RESERVED_ENV = frozenset(
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"}
)
RESERVED_PREFIXES = ("ANDROMEDA_", "RAY_")
