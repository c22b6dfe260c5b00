"""Models and their versions: what a job trains, and the GPU-hours behind each version.

A job names the version it trains as ``name:version`` (``andromeda-mini:v1``); a version
names the version it was fine-tuned from. Which hours count for a version's revenue is
policy (docs/ATTRIBUTION.md): the GPU-seconds of its **completed** jobs, every allocation of
them (preempted ones included: their checkpoints carried the work forward); failed and
cancelled jobs trained nothing that earns, so they count for a provider's volume and
commitment but not for revenue share; ancestors' hours count with the policy's
``ancestor_weight`` per generation (a half for the parent, a quarter for the grandparent).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select as sa_select
from sqlmodel import Session, col, func, select

from scheduler.attribution.policy import MAX_ANCESTRY
from scheduler.db.models import Job, Model, ModelVersion, Provider, UsageInterval
from scheduler.domain.enums import JobStatus
from scheduler.errors import Conflict, NotFound, ValidationFailed

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,98}[a-z0-9])?$")
VERSION_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,48}[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class VersionRef:
    model: str
    version: str

    def __str__(self) -> str:
        return f"{self.model}:{self.version}"


def parse_reference(text: str) -> VersionRef:
    """``"andromeda-mini:v1"`` -> VersionRef; ``ValueError`` says the expected form."""
    name, sep, version = text.strip().partition(":")
    if not sep or not NAME_RE.match(name) or not VERSION_RE.match(version):
        raise ValueError(
            f"{text!r} is not a model version: write name:version, e.g. andromeda-mini:v1"
        )
    return VersionRef(name, version)


def create_model(session: Session, *, name: str, description: str, created_by: str) -> Model:
    if not NAME_RE.match(name):
        raise ValidationFailed("name", "must be lower-case letters, digits, '.', '_' or '-'")
    if session.exec(select(Model).where(Model.name == name)).first():
        raise Conflict(f"model {name!r} already exists")
    model = Model(name=name, description=description, created_by=created_by)
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, *, name: str) -> Model:
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None:
        raise NotFound(f"model {name!r} not found")
    return model


def create_version(
    session: Session,
    *,
    model: Model,
    version: str,
    parent: str | None,
    created_by: str,
) -> ModelVersion:
    """Register ``model:version``; ``parent`` (``name:version``) is the version it was
    fine-tuned from, of this or another model."""
    if not VERSION_RE.match(version):
        raise ValidationFailed("version", "must be letters, digits, '.', '_' or '-'")
    assert model.id is not None
    exists = session.exec(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    ).first()
    if exists:
        raise Conflict(f"model version {model.name}:{version} already exists")
    parent_id = None
    if parent:
        try:
            ref = parse_reference(parent)
        except ValueError as exc:
            raise ValidationFailed("parent", str(exc)) from None
        parent_id = resolve(session, ref, field="parent").id
    row = ModelVersion(
        model_id=model.id, version=version, parent_id=parent_id, created_by=created_by
    )
    session.add(row)
    session.flush()
    return row


def resolve(session: Session, ref: VersionRef, *, field: str = "model") -> ModelVersion:
    """The registered version ``ref`` names, or a 422 that says how to register it."""
    row = session.exec(
        select(ModelVersion)
        .join(Model, col(Model.id) == col(ModelVersion.model_id))
        .where(Model.name == ref.model, ModelVersion.version == ref.version)
    ).first()
    if row is not None:
        return row
    known = session.exec(
        select(ModelVersion.version)
        .join(Model, col(Model.id) == col(ModelVersion.model_id))
        .where(Model.name == ref.model)
        .order_by(col(ModelVersion.id))
    ).all()
    if known:
        hint = f"model {ref.model} has versions {', '.join(known)}"
    else:
        hint = f"no model {ref.model} is registered"
    raise ValidationFailed(
        field,
        f"unknown model version {ref}: {hint}; register it with "
        f"`andromeda model create {ref.model} --version {ref.version}`",
    )


def reference_of(session: Session, version_id: int) -> str:
    row = session.exec(
        select(Model.name, ModelVersion.version)
        .join(Model, col(Model.id) == col(ModelVersion.model_id))
        .where(ModelVersion.id == version_id)
    ).one()
    return f"{row[0]}:{row[1]}"


def references(session: Session) -> dict[int, str]:
    """Every version id -> ``name:version`` (one query)."""
    return {
        vid: f"{name}:{version}"
        for vid, name, version in session.exec(
            select(ModelVersion.id, Model.name, ModelVersion.version).join(
                Model, col(Model.id) == col(ModelVersion.model_id)
            )
        )
        if vid is not None
    }


def ancestry(session: Session, version_id: int) -> list[int]:
    """``version_id`` then its parent, grandparent, ... (at most ``MAX_ANCESTRY`` deep)."""
    parents = dict(session.exec(select(ModelVersion.id, ModelVersion.parent_id)).all())
    chain = [version_id]
    while len(chain) <= MAX_ANCESTRY:
        parent = parents.get(chain[-1])
        if parent is None or parent in chain:
            break
        chain.append(parent)
    return chain


@dataclass(frozen=True, slots=True)
class HoursRow:
    provider: str
    level: str
    gpu_model: str
    status: str
    gpu_seconds: int
    counts_for_revenue: bool


def hours_behind(
    session: Session, *, version_id: int, until: datetime | None = None
) -> list[HoursRow]:
    """GPU-seconds of the version's jobs by provider, level, GPU model and job status,
    aggregated in the database; which of them count for revenue share, by the policy."""
    stmt = (
        sa_select(
            col(Provider.name),
            col(UsageInterval.level),
            col(UsageInterval.gpu_model),
            col(Job.status),
            func.sum(col(UsageInterval.gpu_seconds)),
        )
        .join(Job, col(Job.id) == col(UsageInterval.job_id))
        .join(Provider, col(Provider.id) == col(UsageInterval.provider_id))
        .where(col(Job.model_version_id) == version_id)
        .group_by(
            col(Provider.name),
            col(UsageInterval.level),
            col(UsageInterval.gpu_model),
            col(Job.status),
        )
        .order_by(col(Provider.name), col(UsageInterval.level), col(UsageInterval.gpu_model))
    )
    if until is not None:
        stmt = stmt.where(col(UsageInterval.ended_at) <= until)
    return [
        HoursRow(p, str(lvl), m, str(status), int(s), JobStatus(status) is JobStatus.completed)
        for p, lvl, m, status, s in session.execute(stmt)
    ]
