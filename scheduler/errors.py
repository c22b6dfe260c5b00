"""The domain's exceptions, one tree; the API maps each class to one HTTP status.

AndromedaError
├── ValidationFailed   422  input is well-formed but wrong (names the field)
├── NotFound           404
├── Conflict           409  the state does not allow it (already finished, name taken)
├── TooLarge           413  a request body over its documented limit
├── Unauthenticated    401  no token, or an unknown or revoked one
├── Forbidden          403  the token's role or provider may not do this
└── Unavailable        503  the server cannot do it right now; retry (shutting down, database away)
"""

from __future__ import annotations


class AndromedaError(Exception):
    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationFailed(AndromedaError):
    status_code = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class NotFound(AndromedaError):
    status_code = 404


class Conflict(AndromedaError):
    status_code = 409


class Unauthenticated(AndromedaError):
    status_code = 401


class Forbidden(AndromedaError):
    status_code = 403


class TooLarge(AndromedaError):
    status_code = 413


class Unavailable(AndromedaError):
    status_code = 503
