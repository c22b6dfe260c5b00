"""Stored code packages (``scheduler/packaging.py`` builds and verifies them)."""

from __future__ import annotations

from sqlmodel import Session, col, select

from scheduler.db.models import Allocation, CodePackage, Job
from scheduler.errors import Forbidden, NotFound


def store(session: Session, *, sha256: str, data: bytes, uploaded_by: str) -> bool:
    """Keep ``data`` under ``sha256`` (already verified). False if it was there already."""
    if session.get(CodePackage, sha256) is not None:
        return False
    session.add(
        CodePackage(sha256=sha256, size_bytes=len(data), data=data, uploaded_by=uploaded_by)
    )
    session.flush()
    return True


def size_of(session: Session, *, sha256: str) -> int:
    size = session.exec(select(CodePackage.size_bytes).where(CodePackage.sha256 == sha256)).first()
    if size is None:
        raise NotFound(f"package {sha256} not found")
    return int(size)


def load(session: Session, *, sha256: str) -> bytes:
    package = session.get(CodePackage, sha256)
    if package is None:
        raise NotFound(f"package {sha256} not found")
    return bytes(package.data)


def require_used_by_provider(session: Session, *, sha256: str, provider_id: int) -> None:
    """A provider reads a package only when a job placed on one of its sites uses it."""
    jobs = session.exec(
        select(Job.spec)
        .join(Allocation, col(Allocation.job_id) == col(Job.id))
        .where(Allocation.provider_id == provider_id)
        .where(col(Allocation.released_at).is_(None))
    ).all()
    if not any(spec.get("package") == sha256 for spec in jobs):
        raise Forbidden(f"no job on this provider's sites uses package {sha256}")


def exists(session: Session, *, sha256: str) -> bool:
    return session.get(CodePackage, sha256) is not None
