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
from scheduler.api.notify import Changes, SiteNotifier
from scheduler.api.routes import admin, attribution, jobs, nodes, packages, sites, usage
from scheduler.config import Settings
from scheduler.db.engine import make_engine
from scheduler.loop.cycle import Scheduler, SchedulerThread
from scheduler.policy import PolicyConfig, PolicyFn, schedule

log = logging.getLogger(__name__)


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        notifier.bind(asyncio.get_running_loop())
        thread: SchedulerThread | None = None
        if settings.scheduler_enabled:
            sched = Scheduler(
                engine,
                policy=policy,
                node_lost_after_s=settings.node_lost_after_s,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                on_assignments=notifier.notify,
                grain=settings.period,
                ledger_tick_s=settings.ledger_tick_s,
            )
            thread = SchedulerThread(sched, settings.scheduler_interval_s)
            changes.wake_scheduler = thread.wake
            thread.start()
        app.state.scheduler_thread = thread
        try:
            yield
        finally:
            changes.wake_scheduler = lambda: None
            if thread is not None:
                thread.stop()

    app = FastAPI(
        title="Andromeda compute scheduler",
        version=__version__,
        description="Places GPU training gangs on provider capacity and accounts every GPU-second.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.notifier = notifier
    app.state.changes = changes
    app.state.scheduler_thread = None
    errors.install(app)
    for module in (admin, nodes, sites, packages, jobs, usage, attribution):
        app.include_router(module.router, prefix="/v1")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app
