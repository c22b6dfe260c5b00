"""What the agent tells the server: everything the GPU reader knows, its clock, and a broken
NVML as such; against the real server over HTTP."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from sqlmodel import col, select

from agents.gpu import GpuReaderError, SimulatedReader
from agents.gpu.reader import GpuInfo, GpuSample, MigInstance
from scheduler.client import ApiClient
from scheduler.db.models import Gpu, Node
from scheduler.domain.enums import CommitmentLevel, Role
from tests import factories as f
from tests.agents.live_agent import make_agent


class DetailedReader(SimulatedReader):
    """Simulated GPUs with the details a real NVML reader gives, and an NVML that can
    break while the agent runs."""

    broken: str | None = None

    def cuda_driver_version(self) -> str | None:
        return "12.4"

    def inventory(self) -> list[GpuInfo]:
        gpus = super().inventory()
        return [
            replace(
                g,
                compute_capability="9.0",
                pci_bus_id=f"00000000:0{g.index}:00.0",
                serial=f"165{g.index:04d}",
                mig_enabled=g.index == 1,
                mig_instances=(
                    (
                        MigInstance(
                            uuid=f"MIG-{g.index}-0", profile="3g.40gb", memory_total_bytes=2**35
                        ),
                    )
                    if g.index == 1
                    else ()
                ),
            )
            for g in gpus
        ]

    def sample(self) -> list[GpuSample]:
        if self.broken:
            raise GpuReaderError(self.broken)
        return [replace(s, throttle_reasons=("sw_power_cap",)) for s in super().sample()]


@pytest.fixture
def token(session_of) -> str:  # type: ignore[no-untyped-def]
    with session_of() as s:
        f.provider(s, "orion", CommitmentLevel.committed)
        return f.token(s, Role.provider, "orion")


def test_the_agent_sends_everything_the_reader_knows(
    server, session_of, token, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    reader = DetailedReader("2xH100-80GB", "node-1")
    agent = make_agent(server.url, token, tmp_path, reader=reader)
    agent.register()
    agent.step()
    server.app.state.heartbeats.flush_samples()  # metrics are written every few seconds
    with session_of() as s:
        node = s.exec(select(Node).where(Node.name == "node-1")).one()
        gpus = s.exec(select(Gpu).where(Gpu.node_id == node.id).order_by(col(Gpu.index))).all()
        assert node.cuda_driver_version == "12.4"
        assert [(g.compute_capability, g.pci_bus_id, g.serial, g.mig_enabled) for g in gpus] == [
            ("9.0", "00000000:00:00.0", "1650000", False),
            ("9.0", "00000000:01:00.0", "1650001", True),
        ]
        assert gpus[1].mig_instances == [
            {"uuid": "MIG-1-0", "profile": "3g.40gb", "memory_total_bytes": 2**35}
        ]
        assert [(g.process_count, g.throttle_reasons) for g in gpus] == [
            (0, "sw_power_cap"),
            (0, "sw_power_cap"),
        ]
        # sent_at went along, and the server measured the node's skew from it
        assert node.clock_skew_ms is not None and abs(node.clock_skew_ms) < 5_000
    assert agent.server_clock.offset_s is not None and abs(agent.server_clock.offset_s) < 2
    agent.client.close()


def test_a_broken_nvml_is_reported_as_such_and_sampling_goes_on(
    server, session_of, token, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    reader = DetailedReader("2xH100-80GB", "node-1")
    agent = make_agent(server.url, token, tmp_path, reader=reader)
    agent.register()
    agent.step()
    reader.broken = "NVML stopped answering (the driver was unloaded): reload it"
    agent.step()
    with ApiClient(server.url, token) as api:
        (node,) = api.nodes()
        assert {g.health.value for g in node.gpus} == {"unknown"}
        with session_of() as s:
            row = s.exec(select(Node).where(Node.name == "node-1")).one()
            assert row.gpu_source_error == reader.broken
        reader.broken = None
        agent.step()
        (node,) = api.nodes()
        assert {g.health.value for g in node.gpus} == {"ok"}
    with session_of() as s:
        assert s.exec(select(Node).where(Node.name == "node-1")).one().gpu_source_error is None
    agent.client.close()


def test_a_gpu_detail_the_api_would_refuse_is_left_out_not_the_registration(
    server, token, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    class OddReader(DetailedReader):
        def inventory(self) -> list[GpuInfo]:
            return [replace(g, compute_capability="sm_90") for g in super().inventory()]

    agent = make_agent(server.url, token, tmp_path, reader=OddReader("1xH100-80GB", "node-1"))
    assert len(agent.register().node.gpus) == 1
    agent.client.close()
