"""Bearer tokens: created with a role (and a provider for provider tokens), stored hashed.

Tokens are 32 random bytes, so a plain SHA-256 is enough to store them (no password
stretching needed); the secret is returned once, at creation, and never again.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from scheduler.db.models import ApiToken, Node, Provider, Site
from scheduler.domain.enums import Role
from scheduler.errors import Forbidden, NotFound, Unauthenticated, ValidationFailed

TOKEN_PREFIX = "andr_"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's role, and its provider for provider tokens."""

    token_id: int
    name: str
    role: Role
    provider_id: int | None
    site_id: int | None = None  # a site's registration token: that site's nodes only

    def require(self, *roles: Role) -> None:
        if self.role is Role.admin or self.role in roles:
            return
        wanted = ", ".join(r.value for r in (Role.admin, *roles))
        raise Forbidden(f"role {self.role.value} may not do this (needs one of: {wanted})")

    def require_exactly(self, role: Role) -> None:
        """Only ``role`` itself, not even an admin (a statement is approved by a partner
        manager: the people who pay are not the people who approve)."""
        if self.role is not role:
            raise Forbidden(f"only a {role.value} token may do this (this is {self.role.value})")

    def require_provider(self, provider_id: int) -> None:
        """Provider tokens act only for their own provider; admins act for any."""
        if self.role is Role.admin:
            return
        if self.role is not Role.provider or self.provider_id != provider_id:
            raise Forbidden("this token may not act for that provider")

    def require_node(self, node: Node) -> None:
        """A node's own provider (and, for a site's registration token, its own site)."""
        self.require_node_of(node.provider_id, node.site_id, node.name)

    def require_node_of(self, provider_id: int, site_id: int, name: str) -> None:
        """``require_node`` from what the heartbeat path keeps of a node."""
        self.require_provider(provider_id)
        if self.site_id is not None and site_id != self.site_id:
            raise Forbidden(f"this token registers nodes of another site, not {name!r}")


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    session: Session,
    *,
    name: str,
    role: Role,
    provider_name: str | None = None,
    site_name: str | None = None,
) -> tuple[ApiToken, str]:
    """Create a token; returns the row and the secret (shown once). A provider token that
    names a site is that site's registration token: it registers and reports the site's
    nodes only."""
    if not name.strip():
        raise ValidationFailed("name", "must not be blank")
    provider_id: int | None = None
    if role is Role.provider:
        if not provider_name:
            raise ValidationFailed("provider", "a provider token must name its provider")
        provider = session.exec(select(Provider).where(Provider.name == provider_name)).first()
        if provider is None:
            raise ValidationFailed("provider", f"no provider named {provider_name!r}")
        provider_id = provider.id
    elif provider_name:
        raise ValidationFailed("provider", f"only provider tokens name a provider, not {role}")
    site_id: int | None = None
    if site_name:
        if role is not Role.provider:
            raise ValidationFailed("site", f"only provider tokens name a site, not {role}")
        site = session.exec(select(Site).where(Site.name == site_name)).first()
        if site is None:
            raise ValidationFailed("site", f"no site named {site_name!r}")
        if site.provider_id != provider_id:
            raise ValidationFailed("site", f"site {site_name!r} belongs to another provider")
        site_id = site.id
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name.strip(),
        role=role,
        provider_id=provider_id,
        site_id=site_id,
        token_hash=hash_token(secret),
        prefix=secret[: len(TOKEN_PREFIX) + 6],
    )
    session.add(token)
    session.flush()
    return token, secret


def authenticate(session: Session, *, secret: str | None) -> Principal:
    if not secret:
        raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
    token = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(secret))).first()
    if token is None or token.revoked_at is not None:
        raise Unauthenticated("unknown or revoked token")
    assert token.id is not None
    return Principal(
        token_id=token.id,
        name=token.name,
        role=Role(token.role),
        provider_id=token.provider_id,
        site_id=token.site_id,
    )


def list_tokens(
    session: Session, *, after: int | None = None, limit: int | None = None
) -> list[ApiToken]:
    """Tokens by id: with ``after``, those after that id; ``limit`` of them at most."""
    stmt = select(ApiToken).order_by(col(ApiToken.id)).limit(limit)
    if after is not None:
        stmt = stmt.where(col(ApiToken.id) > after)
    return list(session.exec(stmt))


def revoke_token(session: Session, *, token_id: int, now: datetime) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is None:
        token.revoked_at = now
        session.add(token)
    return token
