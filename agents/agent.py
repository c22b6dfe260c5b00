"""The node agent: registers this host's GPUs with the control plane, keeps its Ray node
running with the right labels, and heartbeats health and utilisation. On a site's head
host (``--head``) it also starts the site's Ray head and runs the site's agent
(``agents/site/agent.py``), which pulls the site's work and runs it on that cluster.

While the server is unreachable the agent keeps sampling and retries with backoff; the
server marks the node lost after ``node_lost_after_s`` without heartbeats and gives it no
new work until heartbeats resume. Work already running is not the agent's: it runs in Ray
and survives the agent's own restart (kill -9 included), which adopts the Ray node again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agents.gpu import GpuReader, SimulatedReader
from agents.raynode import RayNode, ensure_token, token_env
from scheduler.client import ApiClient, ApiError
from scheduler.schemas import GpuReport, GpuSampleIn, Heartbeat, NodeRegister, NodeRegistered

if TYPE_CHECKING:
    from agents.site.agent import SiteAgent

log = logging.getLogger(__name__)


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

    @property
    def token_file(self) -> Path:
        return self.ray_token_file or self.data_dir / "ray-token"


class Agent:
    def __init__(
        self,
        client: ApiClient,
        reader: GpuReader,
        options: AgentOptions,
        *,
        site_client: Callable[[], ApiClient] | None = None,
        restore_signals: Callable[[], None] | None = None,
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
        self.stop_event = threading.Event()
        self._site_thread: threading.Thread | None = None

    def registration_body(self) -> NodeRegister:
        inventory = self.reader.inventory()
        return NodeRegister(
            name=self.options.node_name,
            site=self.options.site,
            hostname=socket.gethostname(),
            level=self.options.level,  # type: ignore[arg-type]
            cpu_count=os.cpu_count() or 0,
            memory_bytes=_memory_bytes(),
            driver_version=self.reader.driver_version(),
            gpus=[
                GpuReport(
                    uuid=g.uuid, index=g.index, name=g.name, memory_total_bytes=g.memory_total_bytes
                )
                for g in inventory
            ],
        )

    def register(self) -> NodeRegistered:
        """Register, retrying with backoff while the server is unreachable.

        A 4xx (bad token, wrong provider, no agreement) is final and raised at once.
        """
        delay = 1.0
        while True:
            try:
                self.registration = self.client.register_node(self.registration_body())
                log.info(
                    "registered node %s in site %s",
                    self.options.node_name,
                    self.registration.node.site,
                )
                return self.registration
            except ConnectionError as exc:
                log.warning("server unreachable (%s); retrying in %.0fs", exc, delay)
            except ApiError as exc:
                if exc.status_code < 500:
                    raise
                log.warning("server error (%s); retrying in %.0fs", exc, delay)
            if self.stop_event.wait(delay):
                raise InterruptedError("stopped before registering")
            delay = min(delay * 2, 30.0)

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

        self._site_thread = threading.Thread(target=_serve, name="site-agent", daemon=True)
        self._site_thread.start()

    # --- heartbeats -------------------------------------------------------------------------
    def heartbeat_once(self) -> None:
        samples = self.reader.sample()
        body = Heartbeat(
            gpus=[
                GpuSampleIn(
                    uuid=s.uuid,
                    health=s.health,
                    health_reasons=list(s.health_reasons),
                    utilization_pct=s.utilization_pct,
                    memory_used_bytes=s.memory_used_bytes,
                    temperature_c=s.temperature_c,
                    power_mw=s.power_mw,
                    energy_mj=s.energy_mj,
                )
                for s in samples
            ],
        )
        node = self.client.heartbeat(self.options.node_name, body)
        if isinstance(self.reader, SimulatedReader):
            # Simulated GPUs look busy exactly while the control plane has them allocated.
            self.reader.set_busy({g.uuid for g in node.gpus if g.busy})

    @staticmethod
    def _try(step: Callable[[], object]) -> None:
        try:
            step()
        except Exception:
            log.exception("%s failed; retrying next interval", getattr(step, "__name__", step))

    def interval(self) -> float:
        if self.options.heartbeat_interval_s is not None:
            return self.options.heartbeat_interval_s
        return float(self.registration.heartbeat_interval_s if self.registration else 10)

    def run(self) -> None:
        """Register, start (or adopt) Ray and the site's agent, heartbeat until stopped."""
        self.register()
        try:
            self.start_ray()
            self.start_site_agent()
            restored = False
            while not self.stop_event.is_set():
                if not restored and self.site_agent and self.site_agent.connected.is_set():
                    restored = True
                    if self.restore_signals is not None:
                        self.restore_signals()
                if self.ray is not None and not self.ray.alive() and not self.stop_event.is_set():
                    log.warning("the Ray node is down; restarting it")
                    try:
                        self.ray.start()
                    except Exception as exc:
                        log.error("Ray node restart failed: %s", exc)
                try:
                    self.heartbeat_once()
                except ConnectionError as exc:
                    log.warning("heartbeat failed, server unreachable: %s", exc)
                except ApiError as exc:
                    log.error("heartbeat refused: %s", exc)
                    if exc.status_code == 404:  # the control plane forgot us: register again
                        self._try(self.register)
                except Exception:
                    # A bad reading must not take the node (and its Ray worker, and the jobs
                    # running on it) down: report it and try again next interval.
                    log.exception("heartbeat failed")
                self.stop_event.wait(self.interval())
        finally:
            self.stop_event.set()
            if self._site_thread is not None:
                self._site_thread.join(30)
            if self.ray is not None:
                self.ray.stop()
            self.reader.close()


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
