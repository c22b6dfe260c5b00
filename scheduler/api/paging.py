"""Cursor paging, the same for every list endpoint.

A list endpoint answers a JSON list, as it always has, of at most ``limit`` items (default
500, at most 5000), in the order of a stable unique key: the id (jobs newest first,
tokens, agreements), the name (nodes, sites, providers, models; statements by provider),
the version (reward policies). When there is more, the answer says where the next page
starts twice: the ``X-Next-Cursor`` header, and an RFC 8288 ``Link: <url>; rel="next"``
header whose URL is this request's with ``cursor`` set. A client sends the cursor back
until an answer has none (``scheduler.client.ApiClient`` does).

Pages are keyset pages: each starts after the key of the last item of the one before, never
at an offset, so a row that exists while a client pages is returned exactly once, however
many rows are added or removed meanwhile.

A cursor is opaque to clients: URL-safe base64 of the last key, as JSON. One that does not
decode to a key of the list's kind is a 422 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError

DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
MAX_CURSOR_CHARS = 400
NEXT_CURSOR_HEADER = "X-Next-Cursor"

K = TypeVar("K", int, str)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[K]):
    """What a request asks for: up to ``limit`` items after the key ``after``."""

    limit: int
    after: K | None = None

    @property
    def fetch(self) -> int:
        """Rows to read: one more than the page, to know whether another page follows."""
        return self.limit + 1


def encode_cursor(key: int | str) -> str:
    raw = json.dumps({"after": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: type[K]) -> K:
    """The key in ``cursor``; ``ValueError`` with a sentence when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)["after"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        key = None
    if isinstance(key, bool) or not isinstance(key, kind):
        raise ValueError(
            "is not a cursor of this list: send back the X-Next-Cursor of its previous page, "
            "or no cursor to start from the first page"
        )
    return key


_LIMIT = Query(
    ge=1,
    le=MAX_LIMIT,
    description=f"items per page (at most {MAX_LIMIT}); the next page's cursor is in the "
    f"{NEXT_CURSOR_HEADER} and Link headers",
)
_CURSOR = Query(
    max_length=MAX_CURSOR_CHARS,
    description=f"where the page starts: the {NEXT_CURSOR_HEADER} of the previous page",
)


def _page(kind: type[K], limit: int, cursor: str | None) -> Page[K]:
    if cursor is None or cursor == "":
        return Page(limit=limit)
    try:
        return Page(limit=limit, after=decode_cursor(cursor, kind))
    except ValueError as exc:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "cursor"), "msg": str(exc), "input": cursor}]
        ) from None


def id_page(
    limit: Annotated[int, _LIMIT] = DEFAULT_LIMIT, cursor: Annotated[str | None, _CURSOR] = None
) -> Page[int]:
    return _page(int, limit, cursor)


def name_page(
    limit: Annotated[int, _LIMIT] = DEFAULT_LIMIT, cursor: Annotated[str | None, _CURSOR] = None
) -> Page[str]:
    return _page(str, limit, cursor)


IdPage = Annotated[Page[int], Depends(id_page)]
NamePage = Annotated[Page[str], Depends(name_page)]

PAGED = (
    f"Pages with a cursor: at most `limit` items (default {DEFAULT_LIMIT}, at most "
    f"{MAX_LIMIT}); when there are more, the `{NEXT_CURSOR_HEADER}` header and a "
    '`Link: <url>; rel="next"` header give the next page.'
)
"""The sentence every list route's description ends with."""


def window(
    items: Sequence[T], key: Callable[[T], K], page: Page[K], *, descending: bool = False
) -> list[T]:
    """The rows of ``page`` from a list read whole (lists that stay small): ordered by
    ``key``, after the cursor, ``page.fetch`` of them at most."""
    ordered = sorted(items, key=key, reverse=descending)
    after = page.after
    if after is not None:
        ordered = [
            item for item in ordered if (key(item) < after if descending else key(item) > after)
        ]
    return ordered[: page.fetch]


def finish(
    items: Sequence[T],
    key: Callable[[T], int | str],
    page: Page[Any],
    request: Request,
    response: Response,
) -> list[T]:
    """The page to answer, from up to ``page.fetch`` rows in key order; sets the next-page
    headers on ``response`` when there was a row beyond the page."""
    if len(items) <= page.limit:
        return list(items)
    shown = list(items[: page.limit])
    cursor = encode_cursor(key(shown[-1]))
    response.headers[NEXT_CURSOR_HEADER] = cursor
    response.headers["Link"] = f'<{request.url.include_query_params(cursor=cursor)}>; rel="next"'
    return shown


__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "NEXT_CURSOR_HEADER",
    "PAGED",
    "IdPage",
    "NamePage",
    "Page",
    "decode_cursor",
    "encode_cursor",
    "finish",
    "id_page",
    "name_page",
    "window",
]
