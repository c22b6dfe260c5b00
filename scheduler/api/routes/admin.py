"""Providers, agreements and tokens (admins; partner managers may read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status
from sqlmodel import select

from scheduler.api.deps import PrincipalDep, SessionDep
from scheduler.db.models import Agreement, ApiToken, Provider
from scheduler.db.types import utcnow
from scheduler.domain.enums import Role
from scheduler.domain.limits import INT32_MAX
from scheduler.schemas import (
    AgreementCreate,
    AgreementPublic,
    ProviderCreate,
    ProviderPublic,
    TokenCreate,
    TokenCreated,
    TokenPublic,
)
from scheduler.services import providers as svc
from scheduler.services import tokens as tokens_svc

router = APIRouter(tags=["admin"])


def _agreement_public(a: Agreement, provider: str) -> AgreementPublic:
    assert a.id is not None
    return AgreementPublic(
        id=a.id,
        provider=provider,
        level=a.level,
        version=a.version,
        committed_gpus=a.committed_gpus,
        committed_gpu_hours_per_month=a.committed_gpu_hours_per_month,
        notice_days=a.notice_days,
        starts_at=a.starts_at,
        ends_at=a.ends_at,
    )


@router.post("/providers", status_code=status.HTTP_201_CREATED, response_model=ProviderPublic)
def create_provider(body: ProviderCreate, session: SessionDep, who: PrincipalDep) -> Provider:
    who.require(Role.admin)
    return svc.create_provider(session, name=body.name, display_name=body.display_name)


@router.get("/providers", response_model=list[ProviderPublic])
def list_providers(session: SessionDep, who: PrincipalDep) -> list[Provider]:
    if who.role is Role.provider:
        return svc.list_providers(session, provider_id=who.provider_id)
    who.require(Role.partner_manager, Role.engineer)
    return svc.list_providers(session)


@router.post(
    "/providers/{name}/agreements",
    status_code=status.HTTP_201_CREATED,
    response_model=AgreementPublic,
)
def add_agreement(
    name: str, body: AgreementCreate, session: SessionDep, who: PrincipalDep
) -> AgreementPublic:
    who.require(Role.admin)
    provider = svc.get_provider(session, name=name)
    agreement = svc.add_agreement(
        session,
        provider=provider,
        level=body.level,
        committed_gpus=body.committed_gpus,
        committed_gpu_hours_per_month=body.committed_gpu_hours_per_month,
        notice_days=body.notice_days,
        starts_at=body.starts_at or utcnow(),
        ends_at=body.ends_at,
    )
    return _agreement_public(agreement, provider.name)


@router.get("/providers/{name}/agreements", response_model=list[AgreementPublic])
def list_agreements(name: str, session: SessionDep, who: PrincipalDep) -> list[AgreementPublic]:
    provider = svc.get_provider(session, name=name)
    assert provider.id is not None
    if who.role is Role.provider:
        who.require_provider(provider.id)
    else:
        who.require(Role.partner_manager)
    return [
        _agreement_public(a, provider.name)
        for a in svc.list_agreements(session, provider_id=provider.id)
    ]


def _token_public(t: ApiToken, names: dict[int, str]) -> TokenPublic:
    assert t.id is not None
    return TokenPublic(
        id=t.id,
        name=t.name,
        role=t.role,
        provider=names.get(t.provider_id or 0),
        prefix=t.prefix,
        created_at=t.created_at,
        revoked_at=t.revoked_at,
    )


def _provider_names(session: SessionDep) -> dict[int, str]:
    return {p.id: p.name for p in session.exec(select(Provider)) if p.id is not None}


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated)
def create_token(body: TokenCreate, session: SessionDep, who: PrincipalDep) -> TokenCreated:
    who.require(Role.admin)
    token, secret = tokens_svc.create_token(
        session, name=body.name, role=body.role, provider_name=body.provider
    )
    public = _token_public(token, _provider_names(session))
    return TokenCreated(**public.model_dump(), token=secret)


@router.get("/tokens", response_model=list[TokenPublic])
def list_tokens(session: SessionDep, who: PrincipalDep) -> list[TokenPublic]:
    who.require(Role.admin)
    names = _provider_names(session)
    return [_token_public(t, names) for t in tokens_svc.list_tokens(session)]


@router.delete("/tokens/{token_id}", response_model=TokenPublic)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=INT32_MAX)], session: SessionDep, who: PrincipalDep
) -> TokenPublic:
    who.require(Role.admin)
    token = tokens_svc.revoke_token(session, token_id=token_id, now=utcnow())
    return _token_public(token, _provider_names(session))
