"""What the cycle's snapshot hands the policy, on SQLite and PostgreSQL: the nodes' free
GPUs and models, the queue's flags, the open allocations' GPUs; and that a snapshot kept
between cycles (``SnapshotCache``) gives exactly what a fresh one reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import col, select, update

from scheduler.db.models import Allocation, Gpu, Job, Node
from scheduler.domain.enums import CommitmentLevel, JobStatus
from scheduler.loop import snapshot
from scheduler.policy import WorkerPlacement
from scheduler.schemas import GpuReport, NodeRegister
from scheduler.services.nodes import register_node
from scheduler.services.transitions import (
    PlacementRecord,
    open_allocation_of,
    release_allocation,
    transition_job,
)
from tests import factories as f

NOW = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)


def _capacity(session, cache=None):  # type: ignore[no-untyped-def]
    return snapshot.capacity(
        session, now=NOW, fresh_within_s=60, site_fresh_within_s=60, cache=cache
    )


def _views(session_of, cache=None):  # type: ignore[no-untyped-def]
    with session_of() as s:
        return (
            snapshot.queue(s, cache),
            _capacity(s, cache),
            snapshot.running(s, cache),
        )


def _mixed_node(session, prov, name: str):  # type: ignore[no-untyped-def]
    """A node whose first two GPUs are H200 and the other two H100."""
    kinds = [f.H200, f.H200, f.H100, f.H100]
    body = NodeRegister(
        name=name,
        hostname=name,
        gpus=[
            GpuReport(uuid=f"GPU-{name}-{i}", index=i, name=k[0], memory_total_bytes=k[1])
            for i, k in enumerate(kinds)
        ],
    )
    node = register_node(session, provider_id=prov.id, body=body, now=NOW)
    node.ray_joined = True
    session.add(node)
    return node


def test_a_node_offers_its_healthy_free_gpus_its_first_gpus_model_and_least_memory(
    session_of,
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "plain", gpus=4, now=NOW)
        _mixed_node(s, orion, "mixed")
        failed = s.exec(select(Gpu).where(Gpu.uuid == "GPU-plain-1")).one()
        failed.health = "failed"
        s.add(failed)
    with session_of() as s:
        views = {v.name: v for v in _capacity(s)}
        ids = {g.uuid: g.id for g in s.exec(select(Gpu))}
    plain, mixed = views["plain"], views["mixed"]
    assert plain.gpu_model == "H100-80GB" and plain.total_gpus == 3
    assert plain.free_gpu_ids == tuple(ids[f"GPU-plain-{i}"] for i in (0, 2, 3))
    assert mixed.gpu_model == "H200-141GB", "the model of its first GPU"
    assert mixed.gpu_memory_bytes == f.H100[1], "the least memory of its GPUs"
    assert mixed.total_gpus == 4 and len(mixed.free_gpu_ids) == 4
    assert plain.level is CommitmentLevel.reserved and plain.site_name == "orion"


def test_a_gpu_stays_taken_until_its_allocation_is_released_not_just_ended(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        node = f.node(s, orion, "n1", gpus=4, now=NOW)
        job = f.job(s, gpus_per_worker=2, now=NOW)
        f.run(s, job, node, NOW)
        job_id = job.id
    with session_of() as s:
        (view,) = _capacity(s)
        assert len(view.free_gpu_ids) == 2
        transition_job(s, job_id=job_id, to=JobStatus.completed, now=NOW)  # not released
    with session_of() as s:
        (view,) = _capacity(s)
        assert len(view.free_gpu_ids) == 2, "its workers may still be on the GPUs"
        alloc = s.exec(select(Allocation).where(Allocation.job_id == job_id)).one()
        release_allocation(s, alloc=alloc, at=NOW)
    with session_of() as s:
        (view,) = _capacity(s)
        assert len(view.free_gpu_ids) == 4


def test_a_job_checkpoints_when_it_names_a_uri_or_its_spec_says_so(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "n1", gpus=4, now=NOW)
        uri = f.job(s, "uri", checkpoint="s3://ckpt/uri", now=NOW).id
        flag = f.job(s, "flag", now=NOW)
        flag.spec = {**flag.spec, "checkpointing": True}
        s.add(flag)
        neither = f.job(s, "neither", now=NOW).id
        no_key = f.job(s, "no-key", now=NOW)
        no_key.spec = {k: v for k, v in no_key.spec.items() if k != "checkpointing"}
        s.add(no_key)
        ids = {"uri": uri, "flag": flag.id, "neither": neither, "no-key": no_key.id}
    with session_of() as s:
        got = {j.job_id: j.checkpointing for j in snapshot.queue(s)}
    assert {name: got[i] for name, i in ids.items()} == {
        "uri": True,
        "flag": True,
        "neither": False,
        "no-key": False,
    }


def test_an_allocation_lists_each_gpu_it_holds_as_node_and_gpu(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        a = f.node(s, orion, "a", gpus=4, now=NOW)
        b = f.node(s, orion, "b", gpus=4, now=NOW)
        job = f.job(s, workers=2, gpus_per_worker=2, now=NOW)
        on_a, on_b = f.gpu_ids(s, a)[2:], f.gpu_ids(s, b)[:2]
        workers = (
            WorkerPlacement(rank=0, node_id=b.id, gpu_ids=tuple(on_b)),  # type: ignore[arg-type]
            WorkerPlacement(rank=1, node_id=a.id, gpu_ids=tuple(on_a)),  # type: ignore[arg-type]
        )
        transition_job(
            s,
            job_id=job.id,  # type: ignore[arg-type]
            to=JobStatus.running,
            now=NOW,
            placement=PlacementRecord(
                provider_id=a.provider_id, site_id=a.site_id, workers=workers
            ),
        )
        expected = [(a.id, g) for g in on_a] + [(b.id, g) for g in on_b]
    with session_of() as s:
        (alloc,) = snapshot.running(s)
    assert alloc.gpus == tuple(sorted(expected)) and alloc.job_id == job.id


def test_a_kept_snapshot_reads_what_a_fresh_one_reads_and_reuses_the_views_that_did_not_change(
    session_of,
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        n1 = f.node(s, orion, "n1", gpus=4, now=NOW)
        f.node(s, orion, "n2", gpus=4, now=NOW)
        running = f.job(s, "running", gpus_per_worker=2, now=NOW)
        f.run(s, running, n1, NOW)
        waiting = f.job(s, "waiting", workers=2, gpus_per_worker=4, now=NOW).id
        other = f.job(s, "other", now=NOW).id
    cache = snapshot.SnapshotCache()
    first = _views(session_of, cache)
    assert first == _views(session_of)
    again = _views(session_of, cache)
    assert all(x is y for a, b in zip(first, again, strict=True) for x, y in zip(a, b, strict=True))

    # something changes in each: a job's priority, a GPU's health, a new allocation, and
    # the first one ends
    later = NOW + timedelta(minutes=5)
    with session_of() as s:
        s.exec(update(Job).where(col(Job.id) == other).values(priority=1000))
        s.exec(update(Gpu).where(col(Gpu.uuid) == "GPU-n2-3").values(health="failed"))
        transition_job(s, job_id=running.id, to=JobStatus.completed, now=later, released=True)  # type: ignore[arg-type]
        small = f.job(s, "small", gpus_per_worker=1, now=NOW)
        f.run(s, small, s.exec(select(Node).where(Node.name == "n2")).one(), later)
    kept = _views(session_of, cache)
    assert kept == _views(session_of)
    jobs, nodes, allocs = kept
    assert [j.job_id for j in jobs] == [other, waiting]
    assert jobs[1] is first[0][0], "an unchanged job is the view built before"
    assert {n.name: n.total_gpus for n in nodes} == {"n1": 4, "n2": 3}
    assert [a.job_id for a in allocs] == [small.id]
    with session_of() as s:
        assert open_allocation_of(s, running.id) is None  # type: ignore[arg-type]
