"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from scheduler.backends.base import ExecutionBackend
from scheduler.config import Settings
from scheduler.db.engine import session_scope
from scheduler.services.tokens import Principal, authenticate

_bearer = HTTPBearer(auto_error=False, description="an Andromeda API token")


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, rolled back on error."""
    with session_scope(request.app.state.engine) as session:
        yield session


# scope="function": the transaction commits before the response is sent, so a client that
# got its answer (a cancel, say) can rely on the change being visible to everyone, the
# scheduler loop included. With the default scope the commit would run after the response.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    return authenticate(session, secret=credentials.credentials if credentials else None)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_backend(request: Request) -> ExecutionBackend | None:
    backend: ExecutionBackend | None = request.app.state.backend
    return backend


BackendDep = Annotated[ExecutionBackend | None, Depends(get_backend)]
