"""Domain exceptions -> HTTP, in one place.

Every error body has ``detail``; a 422 lists ``{loc, msg, type}`` entries in the same shape
FastAPI uses for request validation, so clients handle both kinds alike.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from scheduler.domain.explain import explain_errors
from scheduler.errors import AndromedaError, Unauthenticated, ValidationFailed


def domain_error(exc: AndromedaError) -> tuple[int, dict[str, object], dict[str, str] | None]:
    """Status, body and headers of a domain error's answer."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
    body: dict[str, object]
    if isinstance(exc, ValidationFailed):
        body = {"detail": [{"loc": ["body", exc.field], "msg": exc.detail, "type": "value_error"}]}
    else:
        body = {"detail": exc.message}
    return exc.status_code, body, headers


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AndromedaError)
    status, body, headers = domain_error(exc)
    return JSONResponse(status_code=status, content=body, headers=headers)


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, with each message rewritten as a sentence (see domain/explain.py)."""
    assert isinstance(exc, RequestValidationError)
    detail = explain_errors(exc.errors(), _body_model(request))
    return JSONResponse(status_code=422, content={"detail": detail})


def _body_model(request: Request) -> type[BaseModel] | None:
    """The route's request-body model, so unknown fields can get a "did you mean"."""
    field: Any = getattr(request.scope.get("route"), "body_field", None)
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def install(app: FastAPI) -> None:
    app.add_exception_handler(AndromedaError, _domain_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
