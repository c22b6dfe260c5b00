"""What a node offers the policy: a node whose NVML is broken offers nothing, a MIG-enabled
GPU is not offered to gangs, on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlmodel import select

from scheduler.db.models import Gpu, Node
from scheduler.db.types import utcnow
from scheduler.domain.enums import CommitmentLevel
from scheduler.loop import snapshot
from tests import factories as f


def _capacity(session_of) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with session_of() as s:
        views = snapshot.capacity(s, now=utcnow(), fresh_within_s=60, site_fresh_within_s=60)
        return {v.name: len(v.free_gpu_ids) for v in views}


def test_broken_nvml_takes_the_node_out_and_mig_takes_the_gpu_out(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "orion-1", gpus=4)
        f.node(s, orion, "orion-2", gpus=4)
    assert _capacity(session_of) == {"orion-1": 4, "orion-2": 4}
    with session_of() as s:
        node = s.exec(select(Node).where(Node.name == "orion-1")).one()
        node.gpu_source_error = "NVML: Driver Not Loaded"
        gpu = s.exec(select(Gpu).where(Gpu.uuid == "GPU-orion-2-3")).one()
        gpu.mig_enabled = True
        s.add_all([node, gpu])
    assert _capacity(session_of) == {"orion-2": 3}
