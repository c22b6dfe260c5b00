"""The FastAPI application and, unless disabled, the scheduler loop beside it.

The control plane imports no Ray and runs no job: sites pull their work
(``scheduler/api/routes/sites.py``), so a restart of this process stops nothing that runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import Engine

from scheduler import __version__
from scheduler.api import errors
from scheduler.api.bodylimit import BodyLimit, BodyRule
from scheduler.api.fastpath import HeartbeatFastPath
from scheduler.api.heartbeats import HeartbeatBatcher
from scheduler.api.notify import Changes, SiteNotifier
from scheduler.api.routes import admin, attribution, jobs, nodes, packages, sites, usage
from scheduler.config import Settings
from scheduler.db.engine import make_engine
from scheduler.loop.cycle import Scheduler, SchedulerThread
from scheduler.loop.leader import LeaderLease, LeaseHeld
from scheduler.policy import PolicyConfig, PolicyFn, schedule

log = logging.getLogger(__name__)

# Bodies that may be larger than ``max_body_bytes`` (never smaller), because what they
# carry is larger by design (docs/OPERATIONS.md, Limits):
SITE_REPORT_MAX_BYTES = 64 * 2**20  # up to 64,000 characters of output per running worker
REVENUE_BATCH_MAX_BYTES = 16 * 2**20  # up to 10,000 revenue events of up to about 1.2 KB
EVIDENCE_BATCH_MAX_BYTES = 8 * 2**20  # up to 20,000 evidence windows of about 250 bytes
SITE_HEARTBEATS_MAX_BYTES = 8 * 2**20  # up to 1,000 nodes' heartbeats with their evidence


def body_rules(settings: Settings) -> list[BodyRule]:
    """The routes whose bodies may be larger than ``settings.max_body_bytes``."""
    at_least = settings.max_body_bytes
    return [
        BodyRule(
            "PUT",
            r"/v1/packages/[^/]+$",
            settings.package_max_bytes,
            hint="leave data sets and checkpoints out of working_dir (.gitignore)",
        ),
        BodyRule("POST", r"/v1/sites/[^/]+/report$", max(SITE_REPORT_MAX_BYTES, at_least)),
        BodyRule(
            "POST",
            r"/v1/sites/[^/]+/heartbeats$",
            max(SITE_HEARTBEATS_MAX_BYTES, at_least),
            hint="send fewer nodes per batch",
        ),
        BodyRule("POST", r"/v1/revenue-events$", max(REVENUE_BATCH_MAX_BYTES, at_least)),
        BodyRule(
            "POST",
            r"/v1/nodes/[^/]+/evidence$",
            max(EVIDENCE_BATCH_MAX_BYTES, at_least),
            hint="send the backlog in smaller batches",
        ),
    ]


def create_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    """Build the app. The scheduler loop runs when ``settings.scheduler_enabled``."""
    engine = engine or make_engine(settings.database_url)
    policy: PolicyFn = schedule
    if settings.policy_config is not None:  # refused at start-up, with the file and the key
        config = PolicyConfig.from_file(settings.policy_config)
        policy = functools.partial(schedule, config=config)
        log.info("placement policy settings from %s", settings.policy_config)
    notifier = SiteNotifier()
    changes = Changes(notifier)
    heartbeats = HeartbeatBatcher(
        engine,
        grain=settings.period,
        max_batch=settings.heartbeat_batch_max,
        max_wait_s=settings.heartbeat_batch_wait_s,
        auth_cache_s=settings.heartbeat_auth_cache_s,
        sample_flush_s=settings.heartbeat_sample_flush_s,
        directory_refresh_s=settings.heartbeat_directory_refresh_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        notifier.bind(asyncio.get_running_loop())
        thread: SchedulerThread | None = None
        if settings.scheduler_enabled:
            # Several servers may share one PostgreSQL: the lease decides whose loop runs
            # (the others stand by). SQLite is for one server: refuse to start beside
            # another live one (scheduler/loop/leader.py).
            lease = LeaderLease(
                engine, ttl_s=settings.leader_lease_s, renew_s=settings.leader_renew_s
            )
            if engine.dialect.name == "sqlite":
                try:
                    await asyncio.to_thread(lease.claim_alone)
                except LeaseHeld as exc:
                    log.error("this server does not start: %s", exc)
                    raise LeaseHeld(str(exc)) from None
            app.state.leader_lease = lease
            sched = Scheduler(
                engine,
                policy=policy,
                node_lost_after_s=settings.node_lost_after_s,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                on_assignments=notifier.notify,
                grain=settings.period,
                ledger_tick_s=settings.ledger_tick_s,
                lease=lease,
            )
            thread = SchedulerThread(sched, settings.scheduler_interval_s)
            changes.wake_scheduler = thread.wake
            thread.start()
        app.state.scheduler_thread = thread
        heartbeats.start()
        try:
            yield
        finally:
            changes.wake_scheduler = lambda: None
            if thread is not None:
                thread.stop()  # and releases the lease, for a standby to take at once
            heartbeats.stop()  # writes what is queued and the samples held

    app = FastAPI(
        title="Andromeda compute scheduler",
        version=__version__,
        description="Places GPU training gangs on provider capacity and accounts every GPU-second.",
        lifespan=lifespan,
        # No OpenTelemetry here: FastAPI's native hooks would look the providers up on
        # every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.notifier = notifier
    app.state.changes = changes
    app.state.heartbeats = heartbeats
    app.state.scheduler_thread = None
    app.state.leader_lease = None  # a LeaderLease while the loop is enabled here
    errors.install(app)
    if settings.heartbeat_fast_path:  # inside the body limit, which applies to it too
        app.add_middleware(HeartbeatFastPath, batcher=lambda: heartbeats)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, rules=body_rules(settings))
    for module in (admin, nodes, sites, packages, jobs, usage, attribution):
        app.include_router(module.router, prefix="/v1")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app


def app_from_environment() -> FastAPI:
    """The app of one process of ``andromeda server --workers N`` (settings from the
    environment, as the command left them)."""
    import os
    import sys

    level = os.environ.get("ANDROMEDA_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(0.001)  # as `andromeda server` does (scheduler/cli/admin.py)
    return create_app(Settings())
