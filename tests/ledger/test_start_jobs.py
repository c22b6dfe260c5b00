"""``start_jobs``, the batched pending -> running of a cycle's placements, on both databases:
it writes what ``transition_job`` writes, and leaves out, with ``transition_job``'s reason,
each start that one would refuse."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlmodel import col, select

from scheduler.db.models import Allocation, AllocationGpu, Job, Site
from scheduler.domain.enums import CommitmentLevel, JobStatus
from scheduler.policy.types import WorkerPlacement
from scheduler.services.transitions import PlacementRecord, start_jobs, transition_job
from tests import factories as f

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def world(session_of):  # type: ignore[no-untyped-def]
    """orion: nodes a and b (4 GPUs each, site orion); vega: node v (4 GPUs, site vega);
    six pending jobs of 2 GPUs."""
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        vega = f.provider(s, "vega", CommitmentLevel.spot)
        nodes = {n: f.node(s, orion, n, gpus=4, now=T0) for n in ("a", "b")}
        nodes["v"] = f.node(s, vega, "v", gpus=4, now=T0)
        jobs = [f.job(s, f"j{i}", gpus_per_worker=2, now=T0).id for i in range(6)]
        return {
            "providers": {"orion": orion.id, "vega": vega.id},
            "nodes": {n: (row.id, row.site_id, f.gpu_ids(s, row)) for n, row in nodes.items()},
            "jobs": jobs,
        }


def _placement(world, node: str, gpus: tuple[int, ...], provider: str = "") -> PlacementRecord:  # type: ignore[no-untyped-def]
    node_id, site_id, ids = world["nodes"][node]
    owner = provider or ("vega" if node == "v" else "orion")
    return PlacementRecord(
        provider_id=world["providers"][owner],
        site_id=site_id,
        workers=(WorkerPlacement(rank=0, node_id=node_id, gpu_ids=tuple(ids[g] for g in gpus)),),
    )


def _rows(session, job_id: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What a start wrote for a job, ids and the instant aside."""
    job = session.get(Job, job_id)
    alloc = session.exec(select(Allocation).where(Allocation.job_id == job_id)).one()
    gpus = session.exec(
        select(AllocationGpu)
        .where(AllocationGpu.allocation_id == alloc.id)
        .order_by(col(AllocationGpu.gpu_id))
    ).all()
    return {
        "job": (job.status, job.attempts, job.pending_reason, job.error),
        "allocation": alloc.model_dump(exclude={"id", "job_id", "site_version"}),
        "gpus": [g.model_dump(exclude={"id", "allocation_id"}) for g in gpus],
    }


def test_a_batch_writes_what_transition_job_writes_one_start_at_a_time(world, session_of) -> None:  # type: ignore[no-untyped-def]
    one, two, three = world["jobs"][:3]
    with session_of() as s:
        transition_job(
            s, job_id=one, to=JobStatus.running, now=T0, placement=_placement(world, "a", (0, 1))
        )
    with session_of() as s:
        batch = start_jobs(
            s,
            starts=[(two, _placement(world, "a", (2, 3))), (three, _placement(world, "v", (0, 1)))],
            now=T0,
        )
    assert batch.started == [(two, world["nodes"]["a"][1]), (three, world["nodes"]["v"][1])]
    assert batch.refused == {} and batch.invalid == {}
    with session_of() as s:
        by_one, by_batch = _rows(s, one), _rows(s, two)
        assert by_one["job"] == by_batch["job"] == (JobStatus.running, 1, None, None)
        assert by_one["allocation"] == by_batch["allocation"]
        strip = [{k: v for k, v in g.items() if k != "gpu_id"} for g in by_one["gpus"]]
        assert strip == [{k: v for k, v in g.items() if k != "gpu_id"} for g in by_batch["gpus"]]
        versions = {
            a.job_id: a.site_version for a in s.exec(select(Allocation)).all()
        }  # each open takes the site's next version
        orion = s.get(Site, world["nodes"]["a"][1])
        assert (versions[one], versions[two], orion.assignments_version) == (1, 2, 2)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "start", "refused"),
    [
        ("its job was cancelled", "cancelled", "job {job} already cancelled"),
        ("its job runs already", "running", "job {job} is running, expected pending"),
        ("a GPU is held", "held", "GPUs [{gpu}] are held by another allocation"),
        ("an earlier start took a GPU", "twice", "GPUs [{gpu}] are held by another allocation"),
        ("a GPU is not on the node named", "elsewhere", "GPU {gpu} is not on node {node}"),
        ("the node is another provider's", "provider", "node {node} is not a node of provider"),
    ],
)
def test_a_start_that_transition_job_would_refuse_is_left_out_with_its_reason(  # type: ignore[no-untyped-def]
    world, session_of, name, start, refused
) -> None:
    ok, job = world["jobs"][0], world["jobs"][1]
    a_id, _, a_gpus = world["nodes"]["a"]
    b_id = world["nodes"]["b"][0]
    starts = [(ok, _placement(world, "a", (0, 1)))]
    gpu, node = a_gpus[0], a_id
    if start == "cancelled":
        with session_of() as s:
            transition_job(s, job_id=job, to=JobStatus.cancelled, now=T0)
        starts.append((job, _placement(world, "b", (0, 1))))
    elif start == "running":
        with session_of() as s:
            transition_job(
                s,
                job_id=job,
                to=JobStatus.running,
                now=T0,
                placement=_placement(world, "b", (0, 1)),
            )
        starts.append((job, _placement(world, "b", (2, 3))))
    elif start == "held":
        other = world["jobs"][2]
        with session_of() as s:
            transition_job(
                s,
                job_id=other,
                to=JobStatus.running,
                now=T0,
                placement=_placement(world, "b", (0, 1)),
            )
        gpu = world["nodes"]["b"][2][0]
        starts.append((job, _placement(world, "b", (0, 2))))
    elif start == "twice":
        starts.append((job, _placement(world, "a", (0, 2))))
    elif start == "elsewhere":
        gpu, node = world["nodes"]["b"][2][0], a_id
        placement = _placement(world, "a", (2, 3))
        moved = WorkerPlacement(rank=0, node_id=a_id, gpu_ids=(a_gpus[2], gpu))
        starts.append((job, PlacementRecord(placement.provider_id, placement.site_id, (moved,))))
    elif start == "provider":
        node = b_id
        starts.append((job, _placement(world, "b", (0, 1), provider="vega")))
    with session_of() as s:
        batch = start_jobs(s, starts=starts, now=T0)
    assert [j for j, _ in batch.started] == [ok], name
    assert batch.refused[job].startswith(refused.format(job=job, gpu=gpu, node=node)), batch
    assert batch.invalid == {}
    with session_of() as s:
        allocs = {
            a.job_id for a in s.exec(select(Allocation).where(col(Allocation.ended_at).is_(None)))
        }
        assert ok in allocs
        if start != "running":
            assert job not in allocs


def test_a_start_not_of_its_gangs_shape_or_of_no_job_is_an_error_and_the_rest_start(
    world, session_of
) -> None:  # type: ignore[no-untyped-def]
    ok, wrong = world["jobs"][:2]
    with session_of() as s:
        batch = start_jobs(
            s,
            starts=[
                (wrong, _placement(world, "a", (0, 1, 2))),
                (999_999, _placement(world, "b", (0, 1))),
                (ok, _placement(world, "v", (0, 1))),
            ],
            now=T0,
        )
    assert [j for j, _ in batch.started] == [ok]
    assert batch.invalid == {
        wrong: f"placement for job {wrong} does not match its gang shape",
        999_999: "job 999999 not found",
    }
    with session_of() as s:
        assert s.get(Job, wrong).status is JobStatus.pending  # type: ignore[union-attr]
