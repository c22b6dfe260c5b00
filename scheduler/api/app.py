"""The FastAPI application and, when a Ray address is set, the scheduler loop beside it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import Engine

from scheduler import __version__
from scheduler.api import errors
from scheduler.api.routes import admin, jobs, nodes, usage
from scheduler.backends.base import ExecutionBackend
from scheduler.config import Settings
from scheduler.db.engine import make_engine
from scheduler.loop.cycle import Scheduler, SchedulerThread

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    backend: ExecutionBackend | None = None,
) -> FastAPI:
    """Build the app. The scheduler loop runs only when a backend is given or
    ``settings.ray_address`` is set and ``settings.scheduler_enabled``."""
    engine = engine or make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread: SchedulerThread | None = None
        active_backend = backend
        if active_backend is None and settings.scheduler_enabled and settings.ray_address:
            from scheduler.backends.ray_backend import RayBackend

            active_backend = RayBackend(
                settings.ray_address, log_tail_bytes=settings.log_tail_bytes
            )
        app.state.backend = active_backend
        if active_backend is not None and settings.scheduler_enabled:
            sched = Scheduler(engine, active_backend, node_lost_after_s=settings.node_lost_after_s)
            thread = SchedulerThread(sched, settings.scheduler_interval_s)
            thread.start()
        app.state.scheduler_thread = thread
        try:
            yield
        finally:
            if thread is not None:
                thread.stop()
            if active_backend is not None and backend is None:
                active_backend.close()

    app = FastAPI(
        title="Andromeda compute scheduler",
        version=__version__,
        description="Places GPU training gangs on provider capacity and accounts every GPU-second.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.backend = backend
    errors.install(app)
    for module in (admin, nodes, jobs, usage):
        app.include_router(module.router, prefix="/v1")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app
