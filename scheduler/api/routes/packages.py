"""Code packages: a job's working directory, uploaded by ``andromeda submit`` under its
SHA-256 and fetched by the site that runs the job (see ``scheduler/packaging.py``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine

from scheduler.api.deps import BearerDep, PrincipalDep, SessionDep
from scheduler.db.engine import session_scope
from scheduler.domain.enums import Role
from scheduler.errors import TooLarge, ValidationFailed
from scheduler.packaging import PackageError, verify
from scheduler.services import packages as svc
from scheduler.services.tokens import Principal, authenticate

router = APIRouter(prefix="/packages", tags=["packages"])
Digest = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the zip, hex")]


@router.put("/{sha256}", status_code=status.HTTP_201_CREATED)
async def upload(sha256: Digest, request: Request, credentials: BearerDep) -> dict[str, object]:
    """Store a zip under its SHA-256 (engineers). Uploading the same bytes again is a no-op;
    bytes that do not hash to ``sha256`` are refused. (No database transaction is held
    while the body arrives.) A package may be up to ``package_max_bytes`` (default 100 MiB,
    not the 1 MiB of other bodies); a larger one is answered 413."""
    engine: Engine = request.app.state.engine
    secret = credentials.credentials if credentials else None
    who = await run_in_threadpool(_engineer, engine, secret)
    limit: int = request.app.state.settings.package_max_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    data = bytearray()
    async for chunk in request.stream():
        data.extend(chunk)
        if len(data) > limit:
            raise _too_large(len(data), limit)
    try:
        verify(bytes(data), sha256)
    except PackageError as exc:
        raise ValidationFailed("body", str(exc)) from None
    created = await run_in_threadpool(_store, engine, sha256, bytes(data), who)
    return {"sha256": sha256, "size_bytes": len(data), "created": created}


def _too_large(size: int, limit: int) -> TooLarge:
    return TooLarge(
        f"package of {size} bytes is over the limit of {limit} bytes; leave data sets and "
        "checkpoints out of working_dir (.gitignore)"
    )


def _engineer(engine: Engine, secret: str | None) -> Principal:
    with session_scope(engine) as session:
        who = authenticate(session, secret=secret)
        who.require(Role.engineer)
        return who


def _store(engine: Engine, sha256: str, data: bytes, who: Principal) -> bool:
    with session_scope(engine) as session:
        return svc.store(session, sha256=sha256, data=data, uploaded_by=who.name)


@router.head("/{sha256}")
def exists(sha256: Digest, session: SessionDep, who: PrincipalDep) -> Response:
    """200 when the package is stored, 404 otherwise (so a client uploads it only once)."""
    who.require(Role.engineer)
    size = svc.size_of(session, sha256=sha256)
    return Response(status_code=200, headers={"content-length": str(size)})


@router.get("/{sha256}")
def download(sha256: Digest, session: SessionDep, who: PrincipalDep) -> Response:
    """The zip. Engineers may read any; a provider only one that a job placed on one of its
    sites uses."""
    if who.role is Role.provider:
        assert who.provider_id is not None
        svc.require_used_by_provider(session, sha256=sha256, provider_id=who.provider_id)
    else:
        who.require(Role.engineer)
    data = svc.load(session, sha256=sha256)
    return Response(content=data, media_type="application/zip")
