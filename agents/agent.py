"""The node agent: registers this host's GPUs with the control plane, keeps its Ray worker
running with the right labels, and heartbeats health and utilisation.

While the server is unreachable the agent keeps sampling and retries with backoff; the
server marks the node lost after ``node_lost_after_s`` without heartbeats and gives it no
new work until heartbeats resume. (A durable spool of samples comes with the evidence work.)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agents.gpu import GpuReader, SimulatedReader
from agents.raynode import RayNode
from scheduler.client import ApiClient, ApiError
from scheduler.schemas import GpuReport, GpuSampleIn, Heartbeat, NodeRegister, NodeRegistered

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AgentOptions:
    node_name: str
    level: str | None = None
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    ray_log: Path | None = None
    heartbeat_interval_s: float | None = None  # None: what the server asks for


class Agent:
    def __init__(self, client: ApiClient, reader: GpuReader, options: AgentOptions) -> None:
        self.client = client
        self.reader = reader
        self.options = options
        self.registration: NodeRegistered | None = None
        self.ray: RayNode | None = None
        self.stop_event = threading.Event()

    def registration_body(self) -> NodeRegister:
        inventory = self.reader.inventory()
        return NodeRegister(
            name=self.options.node_name,
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
                log.info("registered node %s", self.options.node_name)
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

    def start_ray(self) -> None:
        if self.options.ray_address is None or self.registration is None:
            return
        self.ray = RayNode(
            address=self.options.ray_address,
            labels=self.registration.ray_labels,
            num_gpus=len(self.registration.node.gpus),
            num_cpus=self.options.ray_num_cpus,
            log_path=self.options.ray_log,
        )
        self.ray.start()

    def ray_joined(self) -> bool:
        if self.options.ray_address is None:
            return True  # the Ray worker is managed outside the agent (KubeRay, ray start)
        return self.ray is not None and self.ray.alive()

    def heartbeat_once(self) -> None:
        samples = self.reader.sample()
        body = Heartbeat(
            ray_joined=self.ray_joined(),
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
        """Register, start Ray, then heartbeat until ``stop_event`` is set."""
        self.register()
        try:
            self.start_ray()
            while not self.stop_event.is_set():
                if self.ray is not None and not self.ray.alive() and not self.stop_event.is_set():
                    log.warning("Ray worker is down; restarting it")
                    try:
                        self.ray.start()
                    except Exception as exc:
                        log.error("Ray worker restart failed: %s", exc)
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
            if self.ray is not None:
                self.ray.stop()
            self.reader.close()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
