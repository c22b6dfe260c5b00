"""Heartbeats served next to FastAPI's router, not through it: ``POST
/v1/nodes/{name}/heartbeat`` (one node) and ``POST /v1/sites/{site}/heartbeats`` (a site's
batch).

A fleet sends thousands of heartbeats a second (scheduler/api/heartbeats.py). Through
FastAPI's routing and dependency machinery one costs about 1.35 ms of CPU here, twice what
it costs beside them (0.67 ms: docs/BENCHMARKS.md, the fast path against FastAPI's
route); this ASGI
middleware answers exactly those routes itself and hands every other request to the app.
It keeps the route's contract: the same body model and limits (the body-limit middleware
outside it still applies), the same errors in the same shapes (401 with
``WWW-Authenticate``, 403/404/409 from the domain, 422 naming the field in a sentence,
503 when a batch could not be written), the same answer (``HeartbeatAck``). The FastAPI
route stays declared: it documents the route in the OpenAPI schema and serves it when
this path is off (``ANDROMEDA_HEARTBEAT_FAST_PATH=false``, which ``bench/bench_fleet.py
--heartbeat-path fastapi`` measures against).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from scheduler.api.errors import domain_error
from scheduler.api.heartbeats import HeartbeatBatcher
from scheduler.domain.explain import explain_errors
from scheduler.errors import AndromedaError
from scheduler.schemas import Heartbeat, SiteHeartbeats

_PREFIX = "/v1/nodes/"
_SUFFIX = "/heartbeat"
_SITE_PREFIX = "/v1/sites/"
_SITE_SUFFIX = "/heartbeats"
_JSON = (b"content-type", b"application/json")


class HeartbeatFastPath:
    def __init__(self, app: ASGIApp, *, batcher: Callable[[], HeartbeatBatcher]) -> None:
        self.app = app
        self.batcher = batcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.endswith(_SUFFIX) and path.startswith(_PREFIX):
                name = path[len(_PREFIX) : -len(_SUFFIX)]
                if name and "/" not in name:
                    await self._serve(scope, receive, send, name, None)
                    return
            elif path.endswith(_SITE_SUFFIX) and path.startswith(_SITE_PREFIX):
                site = path[len(_SITE_PREFIX) : -len(_SITE_SUFFIX)]
                if site and "/" not in site:
                    await self._serve(scope, receive, send, None, site)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, name: str | None, site: str | None
    ) -> None:
        """One node's heartbeat (``name``) or a site's batch (``site``)."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away, or the body limit answered 413 already
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        batcher = self.batcher()
        model: type[BaseModel] = Heartbeat if site is None else SiteHeartbeats
        answer: BaseModel
        try:
            principal = await batcher.principal(_bearer(scope))
            if site is None:
                assert name is not None
                answer = await batcher.submit(name, principal, Heartbeat.model_validate_json(raw))
            else:
                body = SiteHeartbeats.model_validate_json(raw)
                answer = await batcher.submit_site(site, principal, body)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
            await _answer(send, 422, {"detail": explain_errors(errors, model)})
            return
        except AndromedaError as exc:
            status, content, headers = domain_error(exc)
            await _answer(send, status, content, headers)
            return
        payload = answer.__pydantic_serializer__.to_json(answer)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [_JSON, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _bearer(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer`` header, as FastAPI's ``HTTPBearer`` reads
    it (any other scheme counts as no token)."""
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


async def _answer(
    send: Send, status: int, content: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(content, default=str).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(payload)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": payload})
