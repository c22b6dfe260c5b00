"""Helpers for tests that run the real node agent against the real server over HTTP."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.engine import Engine

from agents.agent import Agent, AgentOptions
from agents.gpu import SimulatedReader
from agents.gpu.reader import GpuReader
from scheduler.client import ApiClient
from scheduler.schemas import EvidenceWindow
from tests.support.tcpproxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]

FAST = {
    "heartbeat_interval_s": 0.2,
    "evidence_window_s": 1,  # windows complete every second instead of every minute
    "ray_probe_interval_s": None,
    "retry_initial_s": 0.05,
    "retry_max_s": 0.2,
}


def proxy_to(url: str) -> TcpProxy:
    """A proxy in front of the live server whose connections the test can cut."""
    parts = urlsplit(url)
    assert parts.port is not None
    return TcpProxy((parts.hostname or "127.0.0.1", parts.port))


def make_agent(
    url: str,
    token: str,
    data_dir: Path,
    *,
    name: str = "node-1",
    gpus: str = "2xH100-80GB",
    reader: GpuReader | None = None,
    **options: object,
) -> Agent:
    opts = AgentOptions(node_name=name, data_dir=data_dir, **{**FAST, **options})  # type: ignore[arg-type]
    return Agent(ApiClient(url, token, timeout=5), reader or SimulatedReader(gpus, name), opts)


def windows_for(
    uuids: list[str], minutes: int, start_s: int = 1_800_000_000
) -> list[EvidenceWindow]:
    """``minutes`` 60-s windows per GPU, in time order (all GPUs of a minute together), as
    a spool holds them after an outage."""
    return [
        EvidenceWindow(
            uuid=u,
            start_s=start_s + 60 * m,
            end_s=start_s + 60 * m + 60,
            samples=6,
            utilization_pct_avg=90,
            energy_mj=30_000_000,
            process_seen=True,
        )
        for m in range(minutes)
        for u in uuids
    ]


def stored_keys(engine: Engine, node: str) -> list[tuple[str, int]]:
    """(GPU UUID, start_s) of every evidence window the server stored for ``node``."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT gpu.uuid, gpu_evidence.start_s FROM gpu_evidence "
                "JOIN gpu ON gpu.id = gpu_evidence.gpu_id JOIN node ON node.id = gpu_evidence.node_id "
                "WHERE node.name = :n ORDER BY gpu_evidence.start_s, gpu.uuid"
            ),
            {"n": node},
        )
        return [(str(u), int(s)) for u, s in rows]
