"""A submitted gang is checked against the fleet (counted in the database), on both
databases: the GPU model, GPUs per worker against the largest matching node, the gang
against the largest matching site; a node with two kinds of GPU counts each kind apart."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from scheduler.domain.enums import CommitmentLevel
from scheduler.domain.jobspec import JobSpec
from scheduler.errors import ValidationFailed
from scheduler.schemas import GpuReport, NodeRegister
from scheduler.services.jobs import submit_job
from scheduler.services.nodes import register_node
from tests import factories as f

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def fleet(session_of) -> None:  # type: ignore[no-untyped-def]
    """Site east: e1, e2 of 4 H100. Site west: w1 of 8 H100, w2 of 2 H200 and 2 H100."""
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved, sites=("east", "west"))
        f.node(s, orion, "e1", gpus=4, site="east", now=T0)
        f.node(s, orion, "e2", gpus=4, site="east", now=T0)
        f.node(s, orion, "w1", gpus=8, site="west", now=T0)
        kinds = [f.H200, f.H200, f.H100, f.H100]
        body = NodeRegister(
            name="w2",
            site="west",
            gpus=[
                GpuReport(uuid=f"GPU-w2-{i}", index=i, name=k[0], memory_total_bytes=k[1])
                for i, k in enumerate(kinds)
            ],
        )
        register_node(s, provider_id=orion.id, body=body, now=T0)  # type: ignore[arg-type]
        f.ensure_model_version(s, "m1:v1")


@pytest.mark.parametrize(
    ("workers", "per_worker", "gpu", "oversize", "refused"),
    [
        (1, 8, {"model": "H100"}, False, None),
        (1, 9, {}, False, ("gpus_per_worker", "9 GPUs per worker, but the largest node has 8")),
        (3, 4, {"model": "H100"}, False, ("workers", "the largest site can hold 2 such workers")),
        (3, 4, {"model": "H100"}, True, None),
        (2, 2, {"model": "H200"}, False, ("workers", "the largest site can hold 1 such workers")),
        (1, 4, {}, False, None),
        (5, 2, {}, False, None),
        (3, 3, {}, False, ("workers", "the largest site can hold 2 such workers")),
        (1, 1, {"model": "A100"}, False, ("gpu.model", "no node of the fleet has ever had A100")),
        (1, 1, {"model": "H100", "min_memory_gb": 100}, False, ("gpu", "no node of the fleet has")),
    ],
)
def test_a_gang_is_checked_against_the_largest_node_and_site_that_match(  # type: ignore[no-untyped-def]
    fleet, session_of, workers, per_worker, gpu, oversize, refused
) -> None:
    spec = JobSpec(
        name="train",
        model="m1:v1",
        entrypoint="true",
        workers=workers,
        gpus_per_worker=per_worker,
        gpu=gpu,
    )
    with session_of() as s:
        if refused is None:
            submit_job(s, spec=spec, owner="tester", now=T0, allow_oversize=oversize)
            return
        with pytest.raises(ValidationFailed) as caught:
            submit_job(s, spec=spec, owner="tester", now=T0, allow_oversize=oversize)
    field, message = refused
    assert caught.value.field == field and message in caught.value.detail, caught.value
