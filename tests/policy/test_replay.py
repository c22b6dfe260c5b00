"""Trace replay: exact answers on handmade traces, and work conservation on real Philly jobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from scheduler.domain.enums import CommitmentLevel
from scheduler.policy import (
    Decision,
    JobRequest,
    NodeView,
    Placement,
    ProviderState,
    RunningAllocation,
    WorkerPlacement,
    fifo_schedule,
    schedule,
)
from scheduler.sim import (
    InvalidDecision,
    ReplayResult,
    TraceJob,
    build_cluster,
    load_philly,
    replay,
)
from scheduler.sim.philly import PACKAGED_TRACE, gang_shape

R, C, S = CommitmentLevel.reserved, CommitmentLevel.committed, CommitmentLevel.spot
ONE_NODE = build_cluster([(1, R, 1)])


def tj(
    job_id: int,
    submit: int,
    duration: int,
    *,
    prio: int = 10,
    workers: int = 1,
    gpus: int = 8,
    preemptible: bool = True,
) -> TraceJob:
    return TraceJob(job_id, submit, duration, workers, gpus, prio, preemptible)


def by_id(result: ReplayResult) -> dict[int, tuple[int, int | None, int]]:
    """job_id -> (wait_s, jct_s, preemptions)."""
    return {o.job.job_id: (o.wait_s, o.jct_s, o.preemptions) for o in result.outcomes}


@pytest.mark.parametrize("policy", [schedule, fifo_schedule], ids=["andromeda", "fifo"])
def test_two_jobs_one_node_exact_waits(policy: object) -> None:
    result = replay([tj(0, 0, 100), tj(1, 0, 100)], ONE_NODE, policy, cycle_s=60)  # type: ignore[arg-type]
    # Job 0 runs 0..100; its GPUs are free at the 120 s cycle, when job 1 starts.
    assert by_id(result) == {0: (0, 100, 0), 1: (120, 220, 0)}
    assert result.makespan_s == 220
    assert result.busy_gpu_s == result.useful_gpu_s == 1600
    assert result.utilisation == pytest.approx(1600 / (8 * 220))
    assert result.preemptions == 0 and not result.unfinished
    # Job 1 waited over 0..120 (960 GPU-s of capacity); GPUs were held over 0..100 only.
    assert result.contended_capacity_gpu_s == 960
    assert result.contended_busy_gpu_s == 800


def test_submission_waits_for_the_next_cycle() -> None:
    result = replay([tj(0, 30, 10)], ONE_NODE, schedule, cycle_s=60)
    assert by_id(result) == {0: (30, 40, 0)}


def test_gangs_share_nodes_and_run_side_by_side() -> None:
    jobs = [tj(0, 0, 50, workers=2, gpus=4), tj(1, 0, 50, gpus=8)]
    result = replay(jobs, build_cluster([(1, R, 2)]), schedule, cycle_s=10)
    assert by_id(result) == {0: (0, 50, 0), 1: (0, 50, 0)}
    assert result.utilisation == pytest.approx(1.0)


def test_preemption_with_grace_requeues_and_counts_lost_work() -> None:
    low = tj(0, 0, 5000, prio=1)
    high = tj(1, 700, 100, prio=100, preemptible=False)
    result = replay([low, high], ONE_NODE, schedule, cycle_s=60)
    # At 720 low has run its minimum runtime (600 s): high preempts it with a 30 s grace;
    # low stops at 750, high starts at the next cycle (780) and ends at 880; low restarts
    # from scratch (no checkpoint) at 900 and ends at 5900.
    assert by_id(result) == {0: (150, 5900, 1), 1: (80, 180, 0)}
    assert result.preemptions == 1
    assert result.lost_gpu_s == 750 * 8
    assert result.busy_gpu_s == result.useful_gpu_s + result.lost_gpu_s
    assert result.useful_gpu_s == low.gpu_seconds + high.gpu_seconds


def test_a_checkpointing_victim_resumes_from_its_last_checkpoint() -> None:
    low = replace(tj(0, 0, 5000, prio=1), checkpoint_s=300)
    high = tj(1, 700, 100, prio=100, preemptible=False)
    result = replay([low, high], ONE_NODE, schedule, cycle_s=60)
    # Stopped at 750 s of run, it keeps the 600 s up to its last checkpoint: 4400 s remain.
    assert by_id(result) == {0: (150, 5300, 1), 1: (80, 180, 0)}
    assert result.lost_gpu_s == (750 - 600) * 8


def test_fifo_makes_the_high_priority_job_wait() -> None:
    low = tj(0, 0, 5000, prio=1)
    high = tj(1, 700, 100, prio=100, preemptible=False)
    result = replay([low, high], ONE_NODE, fifo_schedule, cycle_s=60)
    assert by_id(result) == {0: (0, 5000, 0), 1: (4340, 4440, 0)}


def test_priority_order_at_a_contended_cycle() -> None:
    jobs = [
        tj(0, 0, 100, preemptible=False),
        tj(1, 10, 100, prio=1),
        tj(2, 20, 100, prio=100),
    ]
    got = by_id(replay(jobs, ONE_NODE, schedule, cycle_s=60))
    # Job 0 runs 0..100 (not preemptible); at 120 both others are queued; the higher wins.
    assert got == {0: (0, 100, 0), 2: (100, 200, 0), 1: (230, 330, 0)}
    fifo = by_id(replay(jobs, ONE_NODE, fifo_schedule, cycle_s=60))
    assert fifo == {0: (0, 100, 0), 1: (110, 210, 0), 2: (220, 320, 0)}


def test_unplaceable_job_is_reported_and_replay_ends() -> None:
    jobs = [tj(0, 0, 100), tj(1, 0, 100, workers=2)]
    result = replay(jobs, ONE_NODE, schedule, cycle_s=60)
    assert [o.job.job_id for o in result.unfinished] == [1]
    assert by_id(result)[0] == (0, 100, 0)


def test_invalid_decision_is_rejected() -> None:
    def bad_policy(
        queue: Sequence[JobRequest],
        nodes: Sequence[NodeView],
        running: Sequence[RunningAllocation],
        *,
        now_s: int,
        providers: Sequence[ProviderState] = (),
    ) -> Decision:
        workers = tuple(WorkerPlacement(0, 1, (0,)) for _ in range(1))
        return Decision([Placement(j.job_id, 1, workers) for j in queue], {})

    with pytest.raises(InvalidDecision, match="GPU 0 of node .* used twice"):
        replay([tj(0, 0, 100, gpus=1), tj(1, 0, 100, gpus=1)], ONE_NODE, bad_policy)


def test_gang_shape_keeps_gpu_counts() -> None:
    assert [gang_shape(n) for n in (1, 4, 8, 12, 16, 24, 128)] == [
        (1, 1),
        (1, 4),
        (1, 8),
        (2, 6),
        (2, 8),
        (3, 8),
        (16, 8),
    ]


def philly_path() -> Path:
    return PACKAGED_TRACE


@pytest.mark.parametrize("policy", [schedule, fifo_schedule], ids=["andromeda", "fifo"])
def test_philly_replay_conserves_work(policy: object) -> None:
    jobs = load_philly(philly_path(), limit=200)
    assert len(jobs) == 200
    cluster = build_cluster([(1, R, 3), (2, C, 3), (2, S, 2), (3, S, 2)])
    result = replay(jobs, cluster, policy, cycle_s=60)  # type: ignore[arg-type]
    assert not result.unfinished
    assert all(o.finish_s is not None for o in result.outcomes)
    trace_gpu_s = sum(j.gpu_seconds for j in jobs)
    assert result.useful_gpu_s == trace_gpu_s
    assert result.busy_gpu_s == trace_gpu_s + result.lost_gpu_s
    for o in result.outcomes:
        assert o.jct_s is not None
        assert o.jct_s >= o.job.duration_s
        assert o.jct_s * o.job.num_gpus == (o.wait_s + o.job.duration_s) * o.job.num_gpus + (
            o.lost_gpu_s
        )
    assert 0 < result.utilisation_while_waiting <= 1
    if policy is fifo_schedule:
        assert result.preemptions == 0


def test_utilisation_while_waiting_with_preemption() -> None:
    low = tj(0, 0, 5000, prio=1)
    high = tj(1, 700, 100, prio=100, preemptible=False)
    result = replay([low, high], ONE_NODE, schedule, cycle_s=60)
    # The queue is non-empty over 720..900 (high 720..780, low requeued 750..900); the GPUs
    # are held over 720..750 (low's grace) and 780..880 (high).
    assert result.contended_capacity_gpu_s == 8 * 180
    assert result.contended_busy_gpu_s == 8 * 130
    assert 0 <= result.utilisation_while_waiting <= 1
