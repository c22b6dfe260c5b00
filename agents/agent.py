"""The node agent: registers this host's GPUs with the control plane, keeps its Ray node
running with the right labels, heartbeats health and utilisation, and keeps evidence of
what each GPU did. On a site's head host (``--head``) it also starts the site's Ray head
and runs the site's agent (``agents/site/agent.py``), which pulls the site's work and runs
it on that cluster.

Each interval (``step``) it supervises Ray, samples the GPUs, folds the samples into
evidence windows (``agents/evidence.py``, aligned to the server's clock as estimated by
``agents/clock.py``) which go to the durable spool first (``agents/spool.py``), sends a
heartbeat carrying the newest waiting windows, and replays the rest when more are waiting.

While the server is unreachable the agent keeps sampling and spooling, and tries again
every interval; registration retries with exponential backoff and full jitter. The server
marks the node lost after ``node_lost_after_s`` without heartbeats and gives it no new
work until heartbeats resume; the spooled evidence then tells it what the GPUs did
meanwhile. Work already running is not the agent's: it runs in Ray and survives the
agent's own restart (kill -9 included), which adopts the Ray node again and replays the
spool.

Stopping is a drain: the first SIGTERM (or SIGINT) marks the node draining through the API,
so the control plane gives the work on it its agreement's notice and moves it; the agent
heartbeats on until none of its GPUs is held (or ``drain_timeout_s`` passes), then stops
its Ray node and exits. A second signal stops it at once.

The spool is bounded. Near its limit (``agents.spool.NEAR_FULL``) the agent cordons its
node (no new work) with ``SPOOL_FULL_REASON``, rather than letting evidence be lost, and
makes it ready again once the spool has drained below half of that; a cordon or drain set
by anyone else is left alone. The server only hears this while it answers; when it does
not, the node is lost to it anyway (no new work), and the spool, once full, refuses new
windows and logs loudly, keeping the old ones.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import tenacity
from pydantic import ValidationError

from agents.clock import ServerClock
from agents.evidence import WindowAggregator
from agents.gpu import GpuReader, GpuReaderError, SimulatedReader
from agents.gpu.reader import GpuInfo, GpuSample
from agents.raynode import RayNode, ensure_token, token_env
from agents.spool import DEFAULT_MAX_BYTES, NEAR_FULL, Replayed, Spool, SpoolError
from scheduler.client import ApiClient, ApiError
from scheduler.schemas import (
    EVIDENCE_WINDOW_S,
    EvidenceBatch,
    GpuReport,
    GpuSampleIn,
    Heartbeat,
    HeartbeatAck,
    MigInstanceReport,
    NodePublic,
    NodeRegister,
    NodeRegistered,
)

if TYPE_CHECKING:
    import httpx

    from agents.site.agent import SiteAgent

log = logging.getLogger(__name__)

INLINE_EVIDENCE_MAX = 2048  # Heartbeat.evidence's bound
SPOOL_FULL_REASON = "the agent's evidence spool is nearly full: the server is not taking it"
DRAIN_REASON = "agent received SIGTERM"


def retryable(exc: BaseException) -> bool:
    """Worth trying again: the server was unreachable, failed (5xx), timed the request out
    (408) or asked to slow down (429). Any other 4xx is final: the same request would be
    refused again (a bad token, an unknown provider, an invalid body)."""
    if isinstance(exc, ConnectionError):
        return True
    return isinstance(exc, ApiError) and (exc.status_code >= 500 or exc.status_code in (408, 429))


def busy_gpus(node: NodePublic | HeartbeatAck) -> set[str]:
    """UUIDs of the node's GPUs that open allocations hold, from either kind of answer."""
    if isinstance(node, HeartbeatAck):
        return set(node.busy)
    return {g.uuid for g in node.gpus if g.busy}


class StopNow(BaseException):  # noqa: N818 - a signal, not an error
    """Raised from the signal handler on a second SIGTERM/SIGINT: leave the loop at once
    (even from inside a request), still stopping Ray on the way out."""


@dataclass(frozen=True, slots=True)
class AgentOptions:
    node_name: str
    data_dir: Path
    site: str | None = None
    level: str | None = None
    ray: Literal["head", "worker"] | None = None  # None: Ray is managed elsewhere (KubeRay)
    ray_address: str | None = None  # a worker's head (host:port)
    ray_port: int = 6380  # a head's GCS port
    ray_token_file: Path | None = None  # default: <data_dir>/ray-token (created by a head)
    ray_num_cpus: int | None = None
    ray_temp_dir: Path | None = None
    heartbeat_interval_s: float | None = None  # None: what the server asks for
    checkpoint_root: Path | None = None  # default: <data_dir>/checkpoints
    spool_path: Path | None = None  # default: <data_dir>/spool.db
    spool_max_bytes: int = DEFAULT_MAX_BYTES
    drain_timeout_s: int = 900
    ray_probe_interval_s: float | None = 15.0  # None: watch the Ray process only
    evidence_window_s: int = EVIDENCE_WINDOW_S  # the server's; shorter only in tests
    retry_initial_s: float = 1.0  # registration backoff: random in [0, initial * 2^n] ...
    retry_max_s: float = 30.0  # ... capped here

    @property
    def token_file(self) -> Path:
        return self.ray_token_file or self.data_dir / "ray-token"

    @property
    def spool_file(self) -> Path:
        return self.spool_path or self.data_dir / "spool.db"


class Agent:
    def __init__(
        self,
        client: ApiClient,
        reader: GpuReader,
        options: AgentOptions,
        *,
        site_client: Callable[[], ApiClient] | None = None,
        restore_signals: Callable[[], None] | None = None,
        spool: Spool | None = None,
    ) -> None:
        self.client = client
        self.reader = reader
        self.options = options
        self.site_client = site_client
        # Ray's core worker installs its own SIGTERM handler (it logs a stack and exits) when
        # the site's agent connects; the main thread puts ours back so a stop is clean.
        self.restore_signals = restore_signals
        self.registration: NodeRegistered | None = None
        self.ray: RayNode | None = None
        self.site_agent: SiteAgent | None = None
        self.stop_event = threading.Event()  # stop now (the site's agent watches it too)
        self.drain_requested = threading.Event()  # the first SIGTERM: drain, then stop
        self._wake = threading.Event()  # ends the wait between two steps early
        self._site_thread: threading.Thread | None = None
        self.server_clock = ServerClock()
        client.on_response = self._observe
        self.windows = WindowAggregator(options.evidence_window_s)
        self.spool = spool  # opened by run(); --once sends no evidence
        # The latest answer about the node: a heartbeat's, or a status change's.
        self.last_node: NodePublic | HeartbeatAck | None = None
        self._source_error: str | None = None
        self._unreachable_since: float | None = None
        self._drain_deadline: float | None = None  # monotonic; set when the drain began
        self._drain_marked = False
        self._drain_heard = False  # the server has answered since the drain began
        self._cleaning_up = False

    # --- signals ----------------------------------------------------------------------------
    def request_stop(self) -> None:
        """The signal handler's work: the first call asks for a drain, the next stops now.
        Sets events only (no logging, no I/O: it runs between two bytecodes of anything)."""
        if not self.drain_requested.is_set():
            self.drain_requested.set()
            self._wake.set()
            return
        self.stop_event.set()
        self._wake.set()
        if not self._cleaning_up:
            raise StopNow

    def _observe(self, sent_s: float, received_s: float, response: httpx.Response) -> None:
        self.server_clock.observe(sent_s, received_s, response.headers.get("date"))

    # --- registration -----------------------------------------------------------------------
    def registration_body(self) -> NodeRegister:
        cuda = getattr(self.reader, "cuda_driver_version", None)
        try:
            cuda_version = cuda() if callable(cuda) else None
        except GpuReaderError:
            cuda_version = None
        return NodeRegister(
            name=self.options.node_name,
            site=self.options.site,
            hostname=socket.gethostname(),
            level=self.options.level,  # type: ignore[arg-type]
            cpu_count=os.cpu_count() or 0,
            memory_bytes=_memory_bytes(),
            driver_version=self.reader.driver_version(),
            cuda_driver_version=cuda_version,
            gpus=[_gpu_report(g) for g in self.reader.inventory()],
        )

    def register(self) -> NodeRegistered:
        """Register, retrying with exponential backoff and full jitter while the server is
        unreachable or failing (``retryable``). Any other 4xx (bad token, wrong provider, no
        agreement) is final and raised at once; a stop or drain asked for meanwhile raises
        ``InterruptedError``."""
        body = self.registration_body()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(retryable),
            wait=tenacity.wait_random_exponential(
                multiplier=self.options.retry_initial_s, max=self.options.retry_max_s
            ),
            sleep=self._sleep_unless_stopped,
            before_sleep=_log_retry,
            reraise=True,
        )
        self.registration = retrying(self.client.register_node, body)
        log.info(
            "registered node %s in site %s", self.options.node_name, self.registration.node.site
        )
        return self.registration

    def _sleep_unless_stopped(self, seconds: float) -> None:
        if self.stop_event.is_set() or self.drain_requested.is_set():
            raise InterruptedError("stopped before registering")
        self._wake.wait(seconds)
        self._wake.clear()
        if self.stop_event.is_set() or self.drain_requested.is_set():
            raise InterruptedError("stopped before registering")

    # --- Ray ------------------------------------------------------------------------------
    def start_ray(self) -> None:
        """Adopt the Ray node a previous agent left running, or start one."""
        opts = self.options
        if opts.ray is None or self.registration is None:
            return
        opts.data_dir.mkdir(parents=True, exist_ok=True)
        token = ensure_token(opts.token_file) if opts.ray == "head" else opts.token_file
        if opts.ray == "worker" and not token.is_file():
            raise FileNotFoundError(
                f"the site's Ray token is not at {token}: copy it from the head host "
                "(--ray-token-file)"
            )
        if opts.ray == "worker" and opts.ray_address:
            _require_reachable(opts.ray_address)
        os.environ.update(token_env(token))  # the GCS probe talks to Ray from this process
        self.ray = RayNode(
            address=opts.ray_address if opts.ray == "worker" else None,
            token_file=token,
            labels=self.registration.ray_labels,
            num_gpus=len(self.registration.node.gpus),
            num_cpus=opts.ray_num_cpus,
            head_port=opts.ray_port,
            temp_dir=opts.ray_temp_dir,
            log_path=opts.data_dir / "ray.log",
            pid_file=opts.data_dir / "ray.pid",
            probe_interval_s=opts.ray_probe_interval_s,
        )
        if not self.ray.adopt():
            self.ray.start()

    def start_site_agent(self) -> None:
        """On the head host: the site's agent, in a thread of this process."""
        if self.options.ray != "head" or self.registration is None or self.ray is None:
            return
        from agents.site.agent import SiteAgent
        from agents.site.launcher import SiteLauncher

        os.environ.update(token_env(self.options.token_file))  # this process drives Ray
        site = self.registration.node.site
        data = self.options.data_dir
        launcher = SiteLauncher(
            self.ray.gcs_address,
            site,
            scratch_root=data / "scratch",
            checkpoint_root=self.options.checkpoint_root or data / "checkpoints",
        )
        client = self.site_client() if self.site_client else self.client
        agent = SiteAgent(client, site, launcher, package_dir=data / "packages")
        agent.stop_event = self.stop_event
        self.site_agent = agent

        def _serve() -> None:
            try:
                agent.run()
            except Exception:
                log.exception("the site agent stopped")
                self.stop_event.set()
                self._wake.set()

        self._site_thread = threading.Thread(target=_serve, name="site-agent", daemon=True)
        self._site_thread.start()

    def supervise_ray(self) -> None:
        """Restart the Ray node if it died or Ray says it is not alive (not while draining:
        the node takes no new work then)."""
        if self.ray is None or self.stop_event.is_set() or self.drain_requested.is_set():
            return
        if self.ray.alive():
            return
        log.warning("the Ray node is down (%s); restarting it", self.ray.down_reason())
        try:
            self.ray.restart()
        except Exception as exc:
            log.error("Ray node restart failed: %s", exc)

    # --- heartbeats and evidence ------------------------------------------------------------
    def sample(self) -> list[GpuSample]:
        """This interval's samples; none (and ``_source_error`` set) when NVML is broken."""
        try:
            samples = self.reader.sample()
        except GpuReaderError as exc:
            message = str(exc) or type(exc).__name__
            if message != self._source_error:
                log.error("cannot read the GPUs: %s (reported to the server)", message)
            self._source_error = message
            return []
        if self._source_error is not None:
            log.info("the GPUs can be read again")
            self._source_error = None
        return samples

    def heartbeat_once(self) -> HeartbeatAck:
        """Sample, spool the windows this completes, and send one heartbeat carrying the
        newest waiting windows; those leave the spool on its 200. Raises what the client
        raises (``ConnectionError``, ``ApiError``)."""
        spool = self.spool
        samples = self.sample()
        completed = self.windows.add(samples, self.server_clock.now_s())
        if spool is not None and completed:
            self._spooling(lambda: spool.add(completed))
        inline = spool.newest(INLINE_EVIDENCE_MAX) if spool is not None else []
        body = Heartbeat(
            gpus=[_sample_in(s) for s in samples],
            sent_at=datetime.fromtimestamp(self.server_clock.clock(), UTC),
            gpu_source_error=self._source_error[:500] if self._source_error else None,
            evidence=[w for _, w in inline],
        )
        if spool is not None:
            state = {"heartbeat": body.model_dump_json(exclude={"evidence"})}
            if self.server_clock.offset_s is not None:
                state["clock_offset_s"] = repr(self.server_clock.offset_s)
            self._spooling(lambda: spool.set_state(**state))
        try:
            node = self.client.heartbeat(self.options.node_name, body)
        except ApiError as exc:
            if exc.status_code != 422 or not inline:
                raise
            # A window the server will not take must not stop the heartbeats: send them
            # without evidence; the replay finds and drops the bad window.
            log.warning("heartbeat with evidence refused (%s); sending it without", exc)
            node = self.client.heartbeat(
                self.options.node_name, body.model_copy(update={"evidence": []})
            )
            inline = []
        if spool is not None and inline:
            acked = [rid for rid, _ in inline]
            self._spooling(lambda: spool.remove(acked))
        if isinstance(self.reader, SimulatedReader):
            # Simulated GPUs look busy exactly while the control plane has them allocated.
            self.reader.set_busy(busy_gpus(node))
        self.last_node = node
        return node

    @staticmethod
    def _spooling(write: Callable[[], object]) -> None:
        """A spool that cannot be written (a full disk) loses evidence, not heartbeats."""
        try:
            write()
        except SpoolError as exc:
            log.error("%s; heartbeats go on without it", exc)

    def replay(self, budget_s: float) -> Replayed | None:
        """Send the windows the heartbeat could not carry, oldest first, for at most
        ``budget_s`` (the next heartbeat must not wait for a long backlog)."""
        if self.spool is None or self.spool.pending() == 0:
            return None
        deadline = time.monotonic() + budget_s
        name = self.options.node_name
        result = self.spool.replay(
            lambda ws: self.client.post_evidence(name, EvidenceBatch(windows=ws)),
            until=lambda: time.monotonic() >= deadline,
        )
        if result.requests:
            log.info(
                "replayed evidence: %d stored, %d already there, %d refused, %d waiting%s",
                result.stored,
                result.duplicates,
                result.refused,
                result.pending,
                f" (stopped: {result.error})" if result.error else "",
            )
        return result

    def keep_spool_status(self, node: NodePublic | HeartbeatAck) -> None:
        """Cordon the node while the spool is nearly full; make it ready again when the
        spool has drained, unless someone else changed the status meanwhile."""
        if self.spool is None:
            return
        fill = self.spool.fill()
        ours = node.status.value == "cordoned" and node.status_reason == SPOOL_FULL_REASON
        if fill >= NEAR_FULL and node.status.value == "ready":
            log.error(
                "the evidence spool is %.0f %% full: cordoning node %s", fill * 100, node.name
            )
            self.last_node = self.client.set_node_status(node.name, "cordoned", SPOOL_FULL_REASON)
        elif fill < NEAR_FULL / 2 and ours:
            log.info("the evidence spool has drained: node %s is ready again", node.name)
            self.last_node = self.client.set_node_status(node.name, "ready")

    # --- draining -----------------------------------------------------------------------------
    def begin_drain(self) -> None:
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.options.drain_timeout_s
            log.info(
                "draining node %s: the work on it is moved, then the agent stops (at most "
                "%d s; a second signal stops it now)",
                self.options.node_name,
                self.options.drain_timeout_s,
            )
        if self._drain_marked:
            return
        try:
            node = self.client.set_node_status(self.options.node_name, "draining", DRAIN_REASON)
        except ApiError as exc:
            if retryable(exc):
                log.warning("cannot mark node draining yet (%s); trying again", exc)
                return
            # Refused for good (an admin's status stands, a retired node): wait for the GPUs
            # to be free all the same.
            log.error("the server refused to mark node draining: %s", exc)
            self._drain_marked = True
            return
        except ConnectionError as exc:
            log.warning(
                "the server is unreachable, node %s not marked draining (%s); trying again, "
                "and stopping after the drain timeout at the latest: the work on it runs in "
                "Ray and the control plane's lost-node rule handles it",
                self.options.node_name,
                exc,
            )
            return
        self._drain_marked = True
        self.last_node = node
        self._drain_heard = True

    def lift_own_drain(self) -> None:
        """A node this agent drained when it was stopped is ready again when it starts; a
        drain or cordon set by anyone else stays."""
        node = self.registration.node if self.registration else None
        if node is None or node.status.value != "draining" or node.status_reason != DRAIN_REASON:
            return
        try:
            self.client.set_node_status(node.name, "ready")
        except (ApiError, ConnectionError) as exc:
            log.warning("node %s stays draining from the last stop: %s", node.name, exc)
            return
        log.info("node %s was drained when its agent stopped: ready again", node.name)

    def drain_done(self) -> bool:
        """True once the server, answering after the drain began, shows none of the node's
        GPUs held; or when the drain timeout has passed."""
        assert self._drain_deadline is not None
        node = self.last_node
        if self._drain_marked and self._drain_heard and node is not None:
            busy = busy_gpus(node)
            if not busy:
                log.info("node %s is drained: none of its GPUs is held", node.name)
                return True
        if time.monotonic() >= self._drain_deadline:
            if self._unreachable_since is not None:
                log.error(
                    "drain timeout: the server has been unreachable; stopping now (the "
                    "work on this node is handled by the control plane's lost-node rule)"
                )
            else:
                held = len(busy_gpus(node)) if node is not None else "some"
                log.error("drain timeout with %s GPU(s) still held; stopping now", held)
            return True
        return False

    # --- the loop -----------------------------------------------------------------------------
    def step(self) -> None:
        """One interval: drain if asked, supervise Ray, heartbeat (with evidence), replay
        what is left, keep the node's status in line with the spool."""
        if self.drain_requested.is_set():
            self.begin_drain()
        self.supervise_ray()
        node: HeartbeatAck | None = None
        try:
            node = self.heartbeat_once()
        except ConnectionError as exc:
            self._unreachable(exc)
        except ApiError as exc:
            if retryable(exc):
                log.warning("heartbeat failed: %s", exc)
            else:
                log.error("heartbeat refused: %s", exc)
            if exc.status_code == 404:  # the control plane forgot us: register again
                self._try(self.register, "registering again")
        except Exception:
            # A bad reading must not take the node (and its Ray worker, and the jobs
            # running on it) down: report it and try again next interval.
            log.exception("heartbeat failed")
        if node is None:
            return
        if self._unreachable_since is not None:
            log.info(
                "the server answers again after %.0f s",
                time.monotonic() - self._unreachable_since,
            )
            self._unreachable_since = None
        if self._drain_deadline is not None:
            self._drain_heard = True
        self._try(lambda: self.replay(budget_s=self.interval()), "the evidence replay")
        self._try(lambda: self.keep_spool_status(node), "the spool's node status")

    def _unreachable(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
            log.warning("heartbeat failed, server unreachable: %s; spooling evidence", exc)
        else:
            log.debug("server still unreachable: %s", exc)

    @staticmethod
    def _try(step: Callable[[], object], what: str) -> None:
        try:
            step()
        except Exception:
            log.exception("%s failed; trying again next interval", what)

    def interval(self) -> float:
        if self.options.heartbeat_interval_s is not None:
            return self.options.heartbeat_interval_s
        return float(self.registration.heartbeat_interval_s if self.registration else 10)

    def open_spool(self) -> Spool:
        if self.spool is None:
            self.spool = Spool(self.options.spool_file, max_bytes=self.options.spool_max_bytes)
            offset = self.spool.state("clock_offset_s")
            if offset is not None:
                # Until the server answers, align windows as the last agent did.
                self.server_clock.offset_s = float(offset)
            waiting = self.spool.pending()
            if waiting:
                log.info("%d evidence window(s) waiting in %s", waiting, self.spool.path)
        return self.spool

    def run(self) -> None:
        """Register, start (or adopt) Ray and the site's agent, heartbeat until stopped or
        drained."""
        try:
            self.open_spool()
            self.register()
            self.lift_own_drain()
            self.start_ray()
            self.start_site_agent()
            restored = False
            next_at = time.monotonic()
            while not self.stop_event.is_set():
                if not restored and self.site_agent and self.site_agent.connected.is_set():
                    restored = True
                    if self.restore_signals is not None:
                        self.restore_signals()
                self.step()
                if self._drain_deadline is not None and self.drain_done():
                    break
                next_at = max(next_at + self.interval(), time.monotonic())
                self._wake.wait(next_at - time.monotonic())
                self._wake.clear()
        except StopNow:
            log.warning("second stop signal: stopping now")
        finally:
            self._cleaning_up = True
            self.stop_event.set()
            if self._site_thread is not None:
                self._site_thread.join(30)
            if self.ray is not None:
                self.ray.stop()
            self.reader.close()
            if self.spool is not None:
                waiting = self.spool.pending()
                if waiting:
                    log.info("%d evidence window(s) kept in the spool for the next start", waiting)
                self.spool.close()


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("cannot register yet (%s); trying again in %.1f s", exc, wait)


def _gpu_report(g: GpuInfo) -> GpuReport:
    """Everything the reader knows of a GPU; a detail the API would refuse (an odd serial
    from a driver) is left out rather than the registration failing."""
    basic = {
        "uuid": g.uuid,
        "index": g.index,
        "name": g.name,
        "memory_total_bytes": g.memory_total_bytes,
    }
    details = {
        "compute_capability": g.compute_capability,
        "pci_bus_id": g.pci_bus_id,
        "serial": g.serial,
        "mig_enabled": g.mig_enabled,
        "mig_instances": [
            MigInstanceReport(
                uuid=m.uuid, profile=m.profile, memory_total_bytes=m.memory_total_bytes
            )
            for m in g.mig_instances
        ],
    }
    try:
        return GpuReport(**basic, **details)  # type: ignore[arg-type]
    except ValidationError as exc:
        log.warning("GPU %s: details left out of the registration: %s", g.uuid, exc)
        return GpuReport(**basic)  # type: ignore[arg-type]


def _sample_in(s: GpuSample) -> GpuSampleIn:
    return GpuSampleIn(
        uuid=s.uuid,
        health=s.health,
        health_reasons=list(s.health_reasons),
        utilization_pct=s.utilization_pct,
        memory_used_bytes=s.memory_used_bytes,
        temperature_c=s.temperature_c,
        power_mw=s.power_mw,
        energy_mj=s.energy_mj,
        process_count=None if s.process_count is None else min(s.process_count, 4096),
        throttle_reasons=None if s.throttle_reasons is None else list(s.throttle_reasons)[:16],
    )


def _require_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast, and say so, when the site's head cannot be reached at all: ``ray start``
    would otherwise retry for minutes with only its own warnings."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"cannot reach Ray at {address}: {exc}") from exc


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
