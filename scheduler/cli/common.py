"""Options and error handling shared by the commands that talk to a server."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from scheduler.client import ApiClient, ApiError

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_SERVER = "http://127.0.0.1:8700"


def server_options(func: F) -> F:
    func = click.option(
        "--token",
        envvar="ANDROMEDA_TOKEN",
        required=True,
        show_envvar=True,
        help="API token (Authorization: Bearer).",
    )(func)
    func = click.option(
        "--server",
        envvar="ANDROMEDA_SERVER",
        default=DEFAULT_SERVER,
        show_default=True,
        show_envvar=True,
        help="Control-plane URL.",
    )(func)
    return func


def client_from(server: str, token: str) -> ApiClient:
    return ApiClient(server, token)


def handle_errors(func: F) -> F:
    """Turn API and connection errors into one readable line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ApiError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except ConnectionError as exc:
            hint = " (is `andromeda server` running?)" if "http" in str(exc) else ""
            click.echo(f"error: {exc}{hint}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
