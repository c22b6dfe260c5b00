"""Models and their versions (engineers register them), revenue events (admins and partner
managers send them), statements (partner managers review and approve; admins mark them
paid; a provider reads its own), adjustments and the reward policy."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response, status
from sqlmodel import col, select

from scheduler.api import paging
from scheduler.api.deps import PrincipalDep, SessionDep, SettingsDep
from scheduler.attribution import lifecycle, lineage, revenue
from scheduler.attribution.statements import policy_for
from scheduler.db.models import Model, ModelVersion
from scheduler.db.types import utcnow
from scheduler.domain.enums import CommitmentLevel, JobStatus, Role
from scheduler.domain.periods import period_of
from scheduler.domain.units import hours
from scheduler.errors import Conflict, TooLarge, ValidationFailed
from scheduler.schemas import (
    AdjustmentCreate,
    AdjustmentPublic,
    ModelCreate,
    ModelPublic,
    ModelVersionCreate,
    ModelVersionPublic,
    PaymentIn,
    RevenueBatchResult,
    RewardPolicyIn,
    RewardPolicyPublic,
    StatementExplanation,
    StatementPublic,
    StatementVerification,
    VersionHours,
    VersionHoursRow,
)
from scheduler.services.providers import get_provider
from scheduler.services.tokens import Principal

router = APIRouter(tags=["attribution"])
MAX_BATCH = 10_000
PeriodLabel = Annotated[str, Path(max_length=20, description="e.g. 2026-11")]


# --- models -------------------------------------------------------------------------------
def _model_public(session: SessionDep, model: Model) -> ModelPublic:
    refs = lineage.references(session)
    versions = session.exec(
        select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(col(ModelVersion.id))
    ).all()
    return ModelPublic(
        name=model.name,
        description=model.description,
        created_at=model.created_at,
        versions=[
            ModelVersionPublic(
                reference=refs[v.id or 0],
                version=v.version,
                parent=refs.get(v.parent_id) if v.parent_id else None,
                created_at=v.created_at,
            )
            for v in versions
        ],
    )


@router.post("/models", status_code=status.HTTP_201_CREATED, response_model=ModelPublic)
def create_model(body: ModelCreate, session: SessionDep, who: PrincipalDep) -> ModelPublic:
    who.require(Role.engineer)
    model = lineage.create_model(
        session, name=body.name, description=body.description, created_by=who.name
    )
    return _model_public(session, model)


@router.post(
    "/models/{name}/versions", status_code=status.HTTP_201_CREATED, response_model=ModelPublic
)
def create_version(
    name: str, body: ModelVersionCreate, session: SessionDep, who: PrincipalDep
) -> ModelPublic:
    who.require(Role.engineer)
    model = lineage.get_model(session, name=name)
    lineage.create_version(
        session, model=model, version=body.version, parent=body.parent, created_by=who.name
    )
    return _model_public(session, model)


@router.get(
    "/models",
    response_model=list[ModelPublic],
    description="Models by name, each with its versions. " + paging.PAGED,
)
def list_models(
    session: SessionDep,
    who: PrincipalDep,
    page: paging.NamePage,
    request: Request,
    response: Response,
) -> list[ModelPublic]:
    who.require(Role.engineer, Role.partner_manager)
    stmt = select(Model).order_by(col(Model.name)).limit(page.fetch)
    if page.after is not None:
        stmt = stmt.where(col(Model.name) > page.after)
    rows = paging.finish(list(session.exec(stmt)), lambda m: m.name, page, request, response)
    return [_model_public(session, m) for m in rows]


@router.get("/models/{name}", response_model=ModelPublic)
def get_model(name: str, session: SessionDep, who: PrincipalDep) -> ModelPublic:
    who.require(Role.engineer, Role.partner_manager)
    return _model_public(session, lineage.get_model(session, name=name))


@router.get("/models/{name}/versions/{version}/hours", response_model=VersionHours)
def version_hours(name: str, version: str, session: SessionDep, who: PrincipalDep) -> VersionHours:
    """The GPU-hours behind a version, by provider, level, GPU model and job status; which
    of them count for its revenue (docs/ATTRIBUTION.md)."""
    who.require(Role.engineer, Role.partner_manager)
    row = lineage.resolve(session, lineage.VersionRef(name, version))
    assert row.id is not None
    refs = lineage.references(session)
    chain = lineage.ancestry(session, row.id)
    return VersionHours(
        reference=refs[row.id],
        ancestors=[refs[v] for v in chain[1:]],
        rows=[
            VersionHoursRow(
                provider=r.provider,
                level=CommitmentLevel(r.level),
                gpu_model=r.gpu_model,
                job_status=JobStatus(r.status),
                gpu_seconds=r.gpu_seconds,
                gpu_hours=hours(r.gpu_seconds),
                counts_for_revenue=r.counts_for_revenue,
            )
            for r in lineage.hours_behind(session, version_id=row.id)
        ],
    )


# --- revenue events ---------------------------------------------------------------------------
@router.post("/revenue-events", response_model=RevenueBatchResult)
def post_revenue(
    response: Response,
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
    body: Any = Body(
        ..., description="one revenue event (RevenueEventIn), or a list of up to 10,000"
    ),
) -> RevenueBatchResult:
    """Record revenue events, each once by its key. A single event answers 201 (recorded),
    200 (sent before), 409 (its key was used for other content) or 422; a batch answers 200
    with each item's outcome, and keeps the good items. The body may be up to 16 MiB (a
    batch of 10,000 events; 413 above it)."""
    who.require(Role.partner_manager)
    single = isinstance(body, dict)
    items = [body] if single else body
    if not isinstance(items, list):
        raise ValidationFailed("body", "expected an event object or a list of them")
    if len(items) > MAX_BATCH:
        raise TooLarge(f"at most {MAX_BATCH} events per request, got {len(items)}")
    now = utcnow()
    policy = policy_for(session, period_of(now, settings.period))
    results = revenue.record(session, items, now=now, currency=settings.currency, policy=policy)
    out = RevenueBatchResult(
        recorded=sum(r.status == "recorded" for r in results),
        duplicates=sum(r.status == "duplicate" for r in results),
        rejected=sum(r.status in ("conflict", "invalid") for r in results),
        items=results,
    )
    if single:
        (only,) = results
        if only.status == "conflict":
            raise Conflict(only.detail or "conflict")
        if only.status == "invalid":
            raise ValidationFailed("body", only.detail or "invalid")
        response.status_code = 201 if only.status == "recorded" else 200
    return out


# --- statements -------------------------------------------------------------------------------
def _may_read(who: Principal, provider_id: int) -> None:
    if who.role is Role.provider:
        who.require_provider(provider_id)
    else:
        who.require(Role.partner_manager)


@router.get(
    "/statements",
    response_model=list[StatementPublic],
    description="Every provider's statement for a period (a provider token: its own), by "
    "provider name. " + paging.PAGED,
)
def list_statements(
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
    page: paging.NamePage,
    request: Request,
    response: Response,
    period: str = Query(..., max_length=20, description="e.g. 2026-11"),
) -> list[StatementPublic]:
    p = lifecycle.period_from(period, settings.period)
    if who.role is Role.provider:
        provider_id = who.provider_id
    else:
        who.require(Role.partner_manager)
        provider_id = None
    rows = lifecycle.list_statements(
        session,
        period=p,
        now=utcnow(),
        currency=settings.currency,
        provider_id=provider_id,
        after=page.after,
        limit=page.fetch,
    )
    return paging.finish(rows, lambda s: s.provider, page, request, response)


@router.get("/statements/{provider}/{period}", response_model=StatementPublic)
def get_statement(
    provider: str,
    period: PeriodLabel,
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
) -> StatementPublic:
    prov = get_provider(session, name=provider)
    assert prov.id is not None
    _may_read(who, prov.id)
    return lifecycle.statement(
        session,
        provider=prov,
        period=lifecycle.period_from(period, settings.period),
        now=utcnow(),
        currency=settings.currency,
    )


@router.get("/statements/{provider}/{period}/lines/{line}", response_model=StatementExplanation)
def explain_line(
    provider: str,
    period: PeriodLabel,
    line: Annotated[int, Path(ge=1, le=100_000)],
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
) -> StatementExplanation:
    """How one line was derived, down to the events, versions, jobs and GPU-seconds."""
    prov = get_provider(session, name=provider)
    assert prov.id is not None
    _may_read(who, prov.id)
    return lifecycle.explain(
        session,
        provider=prov,
        period=lifecycle.period_from(period, settings.period),
        line_no=line,
        now=utcnow(),
        currency=settings.currency,
    )


@router.post("/statements/{provider}/{period}/approve", response_model=StatementPublic)
def approve(
    provider: str,
    period: PeriodLabel,
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
) -> StatementPublic:
    """Freeze the statement (partner managers only): its lines and their hash never change."""
    who.require_exactly(Role.partner_manager)
    prov = get_provider(session, name=provider)
    return lifecycle.approve(
        session,
        provider=prov,
        period=lifecycle.period_from(period, settings.period),
        now=utcnow(),
        by=who.name,
        currency=settings.currency,
    )


@router.post("/statements/{provider}/{period}/pay", response_model=StatementPublic)
def pay(
    provider: str,
    period: PeriodLabel,
    body: PaymentIn,
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
) -> StatementPublic:
    """Record the payment of an approved statement (admins)."""
    who.require(Role.admin)
    prov = get_provider(session, name=provider)
    return lifecycle.pay(
        session,
        provider=prov,
        period=lifecycle.period_from(period, settings.period),
        reference=body.payment_reference,
        now=utcnow(),
        by=who.name,
        currency=settings.currency,
    )


@router.get("/statements/{provider}/{period}/verify", response_model=StatementVerification)
def verify(
    provider: str,
    period: PeriodLabel,
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
) -> StatementVerification:
    """Recompute an approved statement from the ledger and compare its content hash."""
    prov = get_provider(session, name=provider)
    assert prov.id is not None
    _may_read(who, prov.id)
    return lifecycle.verify(
        session,
        provider=prov,
        period=lifecycle.period_from(period, settings.period),
        currency=settings.currency,
    )


@router.post(
    "/providers/{name}/adjustments",
    status_code=status.HTTP_201_CREATED,
    response_model=AdjustmentPublic,
)
def add_adjustment(
    name: str, body: AdjustmentCreate, session: SessionDep, who: PrincipalDep
) -> AdjustmentPublic:
    """A correction that lands on the provider's next statement to be approved."""
    who.require_exactly(Role.partner_manager)
    prov = get_provider(session, name=name)
    return lifecycle.add_adjustment(
        session, provider=prov, amount=body.amount, reason=body.reason, by=who.name, now=utcnow()
    )


# --- the reward policy ------------------------------------------------------------------------
@router.get(
    "/reward-policies",
    response_model=list[RewardPolicyPublic],
    description="Versions of the reward policy, oldest first. " + paging.PAGED,
)
def list_policies(
    session: SessionDep,
    who: PrincipalDep,
    page: paging.IdPage,
    request: Request,
    response: Response,
) -> list[RewardPolicyPublic]:
    who.require(Role.partner_manager, Role.provider)
    rows = paging.window(lifecycle.list_policies(session), lambda p: p.version, page)
    return paging.finish(rows, lambda p: p.version, page, request, response)


@router.post(
    "/reward-policies", status_code=status.HTTP_201_CREATED, response_model=RewardPolicyPublic
)
def add_policy(body: RewardPolicyIn, session: SessionDep, who: PrincipalDep) -> RewardPolicyPublic:
    """A new version of the policy (admins), applying to periods that start from
    ``effective_from``."""
    who.require(Role.admin)
    return lifecycle.add_policy(session, body=body, now=utcnow())
