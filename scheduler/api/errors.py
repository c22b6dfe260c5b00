"""Domain exceptions -> HTTP, in one place.

Every error body has ``detail``; a 422 lists ``{loc, msg, type}`` entries in the same shape
FastAPI uses for request validation, so clients handle both kinds alike.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from scheduler.errors import AndromedaError, Unauthenticated, ValidationFailed


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AndromedaError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
    body: dict[str, object]
    if isinstance(exc, ValidationFailed):
        body = {"detail": [{"loc": ["body", exc.field], "msg": exc.detail, "type": "value_error"}]}
    else:
        body = {"detail": exc.message}
    return JSONResponse(status_code=exc.status_code, content=body, headers=headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(AndromedaError, _domain_error)
