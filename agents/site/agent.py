"""A site's agent: pulls the site's assignments from the control plane and carries them out
on the site's Ray cluster, reporting what really happens.

It makes outbound HTTP(S) connections only:

- a long poll (``GET /v1/sites/{site}/assignments?after=V&wait=S``) in a thread of its own
  returns as soon as the site's assignments change, so a new allocation starts without
  waiting for any interval;
- reports (``POST /v1/sites/{site}/report``): events as soon as they happen, and at least
  every ``report_interval_s`` the allocations it holds, the Ray nodes alive in the site and
  the running workers' output tails.

Events stay in the outbox until the control plane acknowledges them, and a finished
allocation keeps its Ray actors (so its exit codes) until then; see ``launcher.py``. An
agent that restarts rediscovers its running work in Ray and carries on; the control plane,
for its part, keeps every allocation open through its own restarts, so work that ran while
either side was away is simply reported again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from agents.site.launcher import LaunchEvent, SiteLauncher
from agents.site.packages import PackageCache
from scheduler.client import ApiClient, ApiError
from scheduler.schemas import Assignment, SiteAssignments, SiteEvent, SiteReport

log = logging.getLogger(__name__)

POLL_WAIT_S = 25.0
TICK_S = 0.05  # how often Ray is polled while nothing is starting
FAST_TICK_S = 0.01  # ... and while a gang is being placed or launched


class SiteAgent:
    def __init__(
        self,
        client: ApiClient,
        site: str,
        launcher: SiteLauncher,
        *,
        package_dir: Path,
        log_interval_s: float = 5.0,
        agent_info: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.site = site
        self.launcher = launcher
        self.packages = PackageCache(client, package_dir)
        self.log_interval_s = log_interval_s
        self.agent_info = agent_info or {}
        self.stop_event = threading.Event()
        self.connected = threading.Event()  # set once it drives the site's Ray cluster
        self._wake = threading.Event()
        self._latest: SiteAssignments | None = None
        self._latest_lock = threading.Lock()
        self._applied_version = 0
        self._outbox: dict[str, LaunchEvent] = {}
        self._ended: set[int] = set()  # finished, lost or stopped here; never started again
        self._failed_starts: dict[int, str] = {}
        self._last_report = 0.0
        self._last_logs = 0.0
        self._report_interval_s = 5.0
        self._backoff = _Backoff()

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """Connect to Ray, find running work again, then serve until ``stop_event``."""
        self.open()
        try:
            self.serve()
        finally:
            self.launcher.close()  # leaves Ray; the work running there goes on

    def open(self) -> None:
        """Drive the site's Ray cluster, find the work a previous agent left running, and
        start pulling assignments."""
        self.launcher.connect()
        self.connected.set()
        self.launcher.discover()
        poller = threading.Thread(target=self._poll_assignments, name="site-poll", daemon=True)
        poller.start()

    def serve(self) -> None:
        while not self.stop_event.is_set():
            self.step()
            self._wake.wait(FAST_TICK_S if self.launcher.starting() else TICK_S)
            self._wake.clear()

    def step(self) -> None:
        """One pass: act on the newest assignments, advance Ray, report what is due."""
        latest = self._take_latest()
        if latest is not None:
            self._reconcile(latest)
        for event in self.launcher.poll():
            self._queue(event)
        now = time.monotonic()
        due = now - self._last_report >= self._report_interval_s
        logs_due = now - self._last_logs >= self.log_interval_s
        if (self._outbox or due or logs_due) and self._backoff.ready(now):
            self._report(with_logs=logs_due)

    def _poll_assignments(self) -> None:
        after = -1
        backoff = _Backoff()
        while not self.stop_event.is_set():
            try:
                got = self.client.site_assignments(self.site, after=after, wait=POLL_WAIT_S)
            except (ConnectionError, ApiError) as exc:
                delay = backoff.fail()
                log.warning("cannot get assignments (%s); retrying in %.1fs", exc, delay)
                self.stop_event.wait(delay)
                continue
            backoff.ok()
            after = got.version
            with self._latest_lock:
                self._latest = got
            self._wake.set()

    def _take_latest(self) -> SiteAssignments | None:
        with self._latest_lock:
            latest, self._latest = self._latest, None
        return latest

    # --- acting on assignments ---------------------------------------------------------------
    def _reconcile(self, got: SiteAssignments) -> None:
        """Start what must run and is not running here; stop what runs and must not."""
        self._report_interval_s = got.report_interval_s
        run = {a.allocation_id: a for a in got.assignments if a.action == "run"}
        stop = {a.allocation_id: a for a in got.assignments if a.action == "stop"}
        active = self.launcher.active()
        for alloc_id in sorted(active):
            if alloc_id in stop or alloc_id not in run:
                if alloc_id in self._pending_result():
                    continue  # its result is on the way; torn down once acknowledged
                self._stop(alloc_id, stop.get(alloc_id))
        for alloc_id, a in sorted(run.items()):
            if alloc_id in active or alloc_id in self._ended:
                continue
            self._start(a)
        self._applied_version = got.version

    def _start(self, a: Assignment) -> None:
        try:
            package = self.packages.ensure(a.package_sha256) if a.package_sha256 else None
            self.launcher.start(a, package=package)
        except Exception as exc:
            log.warning("allocation %s could not be started: %s", a.allocation_id, exc)
            self._ended.add(a.allocation_id)
            self._queue(
                LaunchEvent(a.allocation_id, "lost", _utcnow(), error=f"start failed: {exc}")
            )

    def _stop(self, alloc_id: int, a: Assignment | None) -> None:
        grace = 10.0
        if a is not None and a.stop_deadline_at is not None:
            grace = max(0.0, (a.stop_deadline_at - _utcnow()).total_seconds())
        event = self.launcher.stop(alloc_id, grace)
        self._ended.add(alloc_id)
        if event is not None:
            self._queue(event)

    def _pending_result(self) -> set[int]:
        return {e.allocation_id for e in self._outbox.values() if e.kind in ("finished", "lost")}

    def _queue(self, event: LaunchEvent) -> None:
        if event.kind in ("finished", "lost", "stopped"):
            self._ended.add(event.allocation_id)
        self._outbox[f"{event.allocation_id}:{event.kind}"] = event
        self._wake.set()

    # --- reporting ---------------------------------------------------------------------------
    def _report(self, *, with_logs: bool) -> None:
        events = list(self._outbox.items())
        try:
            ray_nodes = self.launcher.alive_nodes()
        except Exception as exc:  # Ray's head is away: say nothing about membership
            log.warning("cannot list the Ray nodes: %s", exc)
            ray_nodes = None
        logs: dict[int, dict[int, str]] = {}
        if with_logs:
            pending = self._pending_result()
            for alloc_id in self.launcher.active() - pending:
                logs[alloc_id] = self.launcher.tails(alloc_id)
        try:
            checkpoints = self.launcher.checkpoints()
        except Exception as exc:
            log.warning("cannot read the workers' checkpoint markers: %s", exc)
            checkpoints = {}
        report = SiteReport(
            applied_version=self._applied_version,
            active=sorted(self.launcher.active()),
            events=[_wire(e) for _, e in events],
            ray_nodes=ray_nodes,
            logs=logs,
            agent=self.agent_info,
            checkpoints=checkpoints,
        )
        now = time.monotonic()
        try:
            result = self.client.site_report(self.site, report)
        except (ConnectionError, ApiError) as exc:
            delay = self._backoff.fail()
            log.warning(
                "report not delivered (%s); %d events kept, retrying in %.1fs",
                exc,
                len(events),
                delay,
            )
            return
        self._backoff.ok()
        self._last_report = now
        if with_logs:
            self._last_logs = now
        accepted = set(result.accepted)
        for key, event in events:
            if key in accepted:
                del self._outbox[key]
                if event.kind in ("finished", "lost"):
                    self.launcher.teardown(event.allocation_id)


def _wire(e: LaunchEvent) -> SiteEvent:
    return SiteEvent(
        allocation_id=e.allocation_id,
        kind=e.kind,  # type: ignore[arg-type]
        at=e.at,
        exit_codes=e.exit_codes,
        error=(e.error or None) and e.error[:2000],
        failed_rank=e.failed_rank,
        logs=e.logs,
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Backoff:
    """Exponential backoff with jitter, capped, for a loop that must not block: ``fail``
    says how long to wait, ``ready`` whether that time has passed; ``ok`` resets it."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 5.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self.not_before = 0.0

    def fail(self) -> float:
        self.failures += 1
        delay = min(self.cap_s, self.base_s * 2 ** (self.failures - 1)) * random.uniform(0.5, 1)
        self.not_before = time.monotonic() + delay
        return delay

    def ok(self) -> None:
        self.failures = 0
        self.not_before = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.not_before
