"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from scheduler.api.notify import Changes
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


# The bare credentials, for async routes that must not hold a transaction while they wait
# (long polls, uploads): they authenticate in a short session of their own.
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_principal(session: SessionDep, credentials: BearerDep) -> Principal:
    return authenticate(session, secret=credentials.credentials if credentials else None)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_changes(request: Request) -> Changes:
    changes: Changes = request.app.state.changes
    return changes


ChangesDep = Annotated[Changes, Depends(get_changes)]
