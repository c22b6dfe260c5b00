"""Request bodies over their size limit are refused before any route reads them.

A pure ASGI middleware, so it sees the body as it arrives: a request whose
``Content-Length`` is over the limit is answered 413 at once, without reading the body; a
body without one (``Transfer-Encoding: chunked``) is counted as it streams in, and the
request is answered 413 as soon as the count passes the limit. The route never sees such a
request: what it would read next is a disconnect, and whatever it answers then is dropped.

The limit is ``Settings.max_body_bytes`` (1 MiB by default) unless a :class:`BodyRule`
gives a route its own (a code package upload; a site's report with its workers' output
tails). Limits are documented in docs/OPERATIONS.md ("Limits").
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BodyRule:
    """Requests of ``method`` whose path matches ``path`` (a regular expression, matched
    from the start) may carry up to ``max_bytes``; ``hint`` is added to the 413's detail."""

    method: str
    path: str
    max_bytes: int
    hint: str = ""

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.match(self.path, path) is not None


def describe_size(n: int) -> str:
    """``1048576`` -> ``1 MiB``; sizes that are not whole KiB or MiB stay in bytes."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


class BodyLimit:
    """The middleware: ``app.add_middleware(BodyLimit, max_bytes=..., rules=[...])``."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, rules: Sequence[BodyRule] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.rules = tuple(rules)

    def limit_for(self, method: str, path: str) -> tuple[int, str]:
        for rule in self.rules:
            if rule.matches(method, path):
                return rule.max_bytes, rule.hint
        return self.max_bytes, ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        limit, hint = self.limit_for(method, path)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, method, path, limit, hint, size=declared)
            return

        received = 0
        refused = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not response_started:
                        await _refuse(send, method, path, limit, hint, size=None)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return  # the 413 has been sent: the route's answer goes nowhere
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


async def _refuse(
    send: Send, method: str, path: str, limit: int, hint: str, *, size: int | None
) -> None:
    what = f"request body of {size} bytes" if size is not None else "request body"
    detail = (
        f"{what} is over the limit of {limit} bytes ({describe_size(limit)}) "
        f"for {method} {path}" + (f"; {hint}" if hint else "")
    )
    log.debug("refused: %s", detail)
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is never read: the connection cannot be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
