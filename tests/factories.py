"""Builders of realistic rows through the real services (no hand-written INSERTs)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Session, select

from scheduler.db.models import Job, Node, Provider, Site
from scheduler.db.types import utcnow
from scheduler.domain.enums import CommitmentLevel, PriorityClass, Role
from scheduler.domain.jobspec import JobSpec
from scheduler.schemas import GpuReport, NodeRegister
from scheduler.services.jobs import submit_job
from scheduler.services.nodes import register_node
from scheduler.services.providers import add_agreement, create_provider
from scheduler.services.sites import create_site
from scheduler.services.tokens import create_token

H100 = ("NVIDIA H100 80GB HBM3", 85_520_809_984)
H200 = ("NVIDIA H200", 150_754_820_096)


def provider(
    session: Session,
    name: str,
    level: CommitmentLevel = CommitmentLevel.reserved,
    *,
    starts_at: datetime | None = None,
    sites: tuple[str, ...] | None = None,
) -> Provider:
    """A provider with one agreement and its sites (default: one site named after it)."""
    p = create_provider(session, name=name)
    add_agreement(
        session, provider=p, level=level, starts_at=starts_at or datetime(2020, 1, 1, tzinfo=UTC)
    )
    for site_name in sites if sites is not None else (name,):
        create_site(session, provider=p, name=site_name)
    return p


def node(
    session: Session,
    prov: Provider,
    name: str,
    gpus: int = 4,
    kind: tuple[str, int] = H100,
    *,
    now: datetime | None = None,
    ray_joined: bool = True,
    site: str | None = None,
) -> Node:
    """A registered node; ``ray_joined`` stands for its site's agent reporting its Ray
    worker alive, and the site's agent is marked as seen ``now``."""
    body = NodeRegister(
        name=name,
        site=site,
        hostname=name,
        gpus=[
            GpuReport(uuid=f"GPU-{name}-{i}", index=i, name=kind[0], memory_total_bytes=kind[1])
            for i in range(gpus)
        ],
    )
    assert prov.id is not None
    when = now or utcnow()
    n = register_node(session, provider_id=prov.id, body=body, now=when)
    n.ray_joined = ray_joined
    site_row = session.get(Site, n.site_id)
    assert site_row is not None
    site_row.last_seen_at = when
    session.add_all([n, site_row])
    session.flush()
    return n


def job(
    session: Session,
    name: str = "train",
    *,
    workers: int = 1,
    gpus_per_worker: int = 1,
    priority: PriorityClass = PriorityClass.normal,
    preemptible: bool = True,
    gpu_model: str | None = None,
    max_runtime: int | None = None,
    now: datetime | None = None,
    entrypoint: str = "true",
    allow_unknown_model: bool = False,
    model: str = "m1:v1",
    checkpoint: str | None = None,
) -> Job:
    ensure_model_version(session, model)
    spec = JobSpec(
        name=name,
        model=model,
        entrypoint=entrypoint,
        priority=priority,
        preemptible=preemptible,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        gpu={"model": gpu_model},  # type: ignore[arg-type]
        max_runtime=max_runtime,
        checkpoint=checkpoint,
    )
    return submit_job(
        session,
        spec=spec,
        owner="tester",
        now=now or utcnow(),
        allow_unknown_model=allow_unknown_model,
    )


def ensure_model_version(session: Session, reference: str, parent: str | None = None) -> str:
    """Register ``name:version`` (and its model) unless it exists; returns the reference."""
    from scheduler.attribution import lineage
    from scheduler.db.models import Model

    ref = lineage.parse_reference(reference)
    model = session.exec(select(Model).where(Model.name == ref.model)).first()
    if model is None:
        model = lineage.create_model(session, name=ref.model, description="", created_by="tests")
    try:
        lineage.resolve(session, ref)
    except Exception:
        lineage.create_version(
            session, model=model, version=ref.version, parent=parent, created_by="tests"
        )
    return reference


def token(session: Session, role: Role, provider_name: str | None = None) -> str:
    _, secret = create_token(
        session, name=f"{role.value}-token", role=role, provider_name=provider_name
    )
    return secret


def gpu_ids(session: Session, node_row: Node) -> list[int]:
    from sqlmodel import col

    from scheduler.db.models import Gpu

    return [
        g.id  # type: ignore[misc]
        for g in session.exec(
            select(Gpu).where(Gpu.node_id == node_row.id).order_by(col(Gpu.index))
        )
    ]


def run(
    session: Session,
    job_row: Job,
    node_row: Node,
    at: datetime,
    *,
    gpus: list[int] | None = None,
    running_after_s: float | None = 0,
) -> None:
    """Place ``job_row`` on ``node_row`` at ``at``, as the scheduler would, and (unless
    ``running_after_s`` is None) have its site report the gang running that much later."""
    from datetime import timedelta

    from scheduler.domain.enums import JobStatus
    from scheduler.policy.types import WorkerPlacement
    from scheduler.services.transitions import (
        PlacementRecord,
        mark_running,
        open_allocation_of,
        transition_job,
    )

    ids = gpus if gpus is not None else gpu_ids(session, node_row)
    per = job_row.gpus_per_worker
    workers = tuple(
        WorkerPlacement(rank=r, node_id=node_row.id, gpu_ids=tuple(ids[r * per : (r + 1) * per]))  # type: ignore[arg-type]
        for r in range(job_row.num_workers)
    )
    transition_job(
        session,
        job_id=job_row.id,  # type: ignore[arg-type]
        to=JobStatus.running,
        now=at,
        placement=PlacementRecord(
            provider_id=node_row.provider_id, site_id=node_row.site_id, workers=workers
        ),
    )
    if running_after_s is not None:
        alloc = open_allocation_of(session, job_row.id)  # type: ignore[arg-type]
        ran = at + timedelta(seconds=running_after_s)
        assert alloc is not None and mark_running(session, alloc=alloc, at=ran, now=ran)


def get_provider(session: Session, name: str) -> Provider:
    from scheduler.services.providers import get_provider as by_name

    return by_name(session, name=name)
