"""Table-driven tests of the placement policy, in the style of Kueue's scheduler tests.

Each case gives the cluster (nodes), what is running, the queue, and what the cycle must
decide. Every case is also checked against the invariants that hold for any decision
(`_check_invariants`), so a case only needs to state what is specific to it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest

from scheduler.domain.enums import CommitmentLevel
from scheduler.policy import (
    DEFAULT_CONFIG,
    Decision,
    JobRequest,
    NodeView,
    PolicyConfig,
    RunningAllocation,
    fifo_schedule,
    schedule,
    validate,
)

GB = 10**9
R, C, S = CommitmentLevel.reserved, CommitmentLevel.committed, CommitmentLevel.spot


def node(
    node_id: int,
    *,
    provider: int = 1,
    level: CommitmentLevel = R,
    gpus: int = 8,
    free: tuple[int, ...] | None = None,
    model: str = "H100-80GB",
    mem: int = 80 * GB,
) -> NodeView:
    return NodeView(
        node_id=node_id,
        name=f"node-{node_id}",
        provider_id=provider,
        level=level,
        gpu_model=model,
        gpu_memory_bytes=mem,
        free_gpu_ids=tuple(range(gpus)) if free is None else free,
        total_gpus=gpus,
    )


def job(
    job_id: int,
    *,
    prio: int = 10,
    seq: int | None = None,
    workers: int = 1,
    gpus: int = 8,
    model: str | None = None,
    mem: int | None = None,
) -> JobRequest:
    return JobRequest(
        job_id=job_id,
        priority=prio,
        seq=job_id if seq is None else seq,
        num_workers=workers,
        gpus_per_worker=gpus,
        gpu_model=model,
        min_gpu_memory_bytes=mem,
        preemptible=True,
    )


def alloc(
    allocation_id: int,
    gpus: list[tuple[int, int]],
    *,
    prio: int = 1,
    preemptible: bool = True,
    provider: int = 1,
    started: int = 0,
) -> RunningAllocation:
    return RunningAllocation(
        allocation_id=allocation_id,
        job_id=1000 + allocation_id,
        priority=prio,
        preemptible=preemptible,
        provider_id=provider,
        started_at_s=started,
        gpus=tuple(gpus),
    )


def on(node_id: int, gpu_ids: range | list[int]) -> list[tuple[int, int]]:
    return [(node_id, g) for g in gpu_ids]


@dataclass
class Case:
    name: str
    nodes: list[NodeView]
    queue: list[JobRequest]
    running: list[RunningAllocation] = field(default_factory=list)
    # job_id -> {node_id: GPUs on that node}; the placed jobs must be exactly these keys.
    want_placements: dict[int, dict[int, int]] = field(default_factory=dict)
    want_providers: dict[int, int] = field(default_factory=dict)
    want_gpu_ids: dict[int, dict[int, tuple[int, ...]]] = field(default_factory=dict)
    # job_id -> the allocations it stops (it stays pending until they have stopped)
    want_preemptions: dict[int, tuple[int, ...]] = field(default_factory=dict)
    want_pending: dict[int, str] = field(default_factory=dict)  # job_id -> reason substring
    want_order: list[int] | None = None  # order of placements


CASES = [
    # --- queue order -----------------------------------------------------------------
    Case(
        "priority beats FIFO",
        nodes=[node(1)],
        queue=[job(1, prio=10, seq=1), job(2, prio=100, seq=2)],
        want_placements={2: {1: 8}},
        want_pending={1: "expected to start by 1970-01-02 00:16 UTC on site 0 of provider 1"},
    ),
    Case(
        "FIFO within a priority",
        nodes=[node(1)],
        queue=[job(1, seq=7), job(2, seq=3), job(3, seq=5)],
        want_placements={2: {1: 8}},
        want_pending={1: "expected to start by", 3: "expected to start by"},
    ),
    Case(
        "placements come out in queue order",
        nodes=[node(1), node(2)],
        queue=[job(1, prio=1, gpus=4), job(2, prio=5, gpus=4), job(3, prio=5, seq=0, gpus=4)],
        want_placements={1: {2: 4}, 2: {1: 4}, 3: {1: 4}},
        want_order=[3, 2, 1],
    ),
    # --- gangs -----------------------------------------------------------------------
    Case(
        "gang is all or nothing (cluster too small)",
        nodes=[node(1), node(2)],
        queue=[job(1, workers=3)],
        want_pending={1: "needs 3 workers x 8 GPUs in one provider; the largest provider has 16"},
    ),
    Case(
        "gang is all or nothing (not enough free now)",
        nodes=[node(1), node(2), node(3, free=())],
        queue=[job(1, workers=3)],
        want_pending={1: "waiting for 3 workers x 8 free GPUs in one provider (16 free"},
    ),
    Case(
        "gang spans nodes of one provider",
        nodes=[node(1), node(2)],
        queue=[job(1, workers=2)],
        want_placements={1: {1: 8, 2: 8}},
        want_providers={1: 1},
    ),
    Case(
        "gang never spans two providers even if the total would fit",
        nodes=[node(1, provider=1), node(2, provider=2)],
        queue=[job(1, workers=2)],
        want_pending={
            1: "the largest provider has 8 matching GPUs (16 across all providers; "
            "a gang never spans providers)"
        },
    ),
    Case(
        "gang picks the provider that can hold all of it",
        nodes=[node(1, provider=1), node(2, provider=2), node(3, provider=2, level=S)],
        queue=[job(1, workers=2)],
        want_placements={1: {2: 8, 3: 8}},
        want_providers={1: 2},
    ),
    Case(
        "several workers share a node",
        nodes=[node(1), node(2)],
        queue=[job(1, workers=4, gpus=2)],
        want_placements={1: {1: 8}},
    ),
    Case(
        "a worker never splits across nodes",
        nodes=[node(1, free=(0, 1, 2, 3)), node(2, free=(0, 1, 2, 3))],
        queue=[job(1, gpus=8)],
        want_pending={1: "fragmented: the best provider fits 0 of 1 workers"},
    ),
    Case(
        "worker larger than any node",
        nodes=[node(1)],
        queue=[job(1, gpus=16)],
        want_pending={1: "needs 16 GPUs per worker on one node; the largest ready node"},
    ),
    Case(
        "invalid gang shape",
        nodes=[node(1)],
        queue=[job(1, workers=0)],
        want_pending={1: "invalid gang shape"},
    ),
    # --- constraints -----------------------------------------------------------------
    Case(
        "model constraint",
        nodes=[node(1, model="A100-80GB"), node(2, model="H100-80GB", level=S)],
        queue=[job(1, model="H100")],
        want_placements={1: {2: 8}},
    ),
    Case(
        "memory constraint",
        nodes=[node(1, model="H100-80GB"), node(2, model="H100-94GB", mem=94 * GB, level=S)],
        queue=[job(1, model="H100", mem=90 * GB)],
        want_placements={1: {2: 8}},
    ),
    Case(
        "no node of the model",
        nodes=[node(1)],
        queue=[job(1, model="H200", mem=141 * GB)],
        want_pending={1: "no ready node has H200 GPUs with >= 141 GB"},
    ),
    Case(
        "no node with enough memory",
        nodes=[node(1)],
        queue=[job(1, mem=141 * GB)],
        want_pending={1: "no ready node has GPUs with >= 141 GB"},
    ),
    Case(
        "no nodes at all",
        nodes=[],
        queue=[job(1)],
        want_pending={1: "no ready node has GPUs"},
    ),
    # --- commitment levels and packing ----------------------------------------------
    Case(
        "reserved before committed before spot",
        nodes=[
            node(1, provider=1, level=S),
            node(2, provider=2, level=C),
            node(3, provider=3, level=R),
        ],
        queue=[job(1), job(2), job(3)],
        want_placements={1: {3: 8}, 2: {2: 8}, 3: {1: 8}},
        want_providers={1: 3, 2: 2, 3: 1},
    ),
    Case(
        "level beats packing",
        nodes=[node(1, level=C, free=(0, 1)), node(2, level=R)],
        queue=[job(1, gpus=2)],
        want_placements={1: {2: 2}},
    ),
    Case(
        "best fit within a level",
        nodes=[node(1), node(2, free=(0, 1, 2)), node(3, free=(4, 5))],
        queue=[job(1, gpus=2), job(2, gpus=3)],
        want_placements={1: {3: 2}, 2: {2: 3}},
    ),
    Case(
        "gang packs onto a whole node rather than splitting",
        nodes=[node(1, free=(0, 1, 2, 3, 4, 5)), node(2)],
        queue=[job(1, workers=2, gpus=4)],
        want_placements={1: {2: 8}},
    ),
    Case(
        "ties broken by node id; lowest GPU ids first",
        nodes=[node(5, free=(7, 3, 5, 1)), node(2, free=(6, 4, 2, 0))],
        queue=[job(1, gpus=2)],
        want_placements={1: {2: 2}},
        want_gpu_ids={1: {2: (0, 2)}},
    ),
    Case(
        "GPUs placed earlier in the cycle are taken",
        nodes=[node(1)],
        queue=[job(1, gpus=4), job(2, gpus=4), job(3, gpus=4)],
        want_placements={1: {1: 4}, 2: {1: 4}},
        want_gpu_ids={1: {1: (0, 1, 2, 3)}, 2: {1: (4, 5, 6, 7)}},
        want_pending={3: "expected to start by"},
    ),
    Case(
        "best effort: a gang that does not fit does not block smaller jobs",
        nodes=[node(1), node(2, free=(0, 1, 2, 3))],
        queue=[job(1, workers=2), job(2, gpus=4)],
        want_placements={2: {2: 4}},
        want_pending={1: "waiting for 2 workers x 8 free GPUs in one provider (12 free"},
    ),
    # --- preemption ------------------------------------------------------------------
    Case(
        "preempts lower-priority preemptible work",
        nodes=[node(1, free=())],
        running=[alloc(100, on(1, range(8)), prio=1)],
        queue=[job(1, prio=100)],
        want_preemptions={1: (100,)},
        want_pending={1: "preempting job 1100 on site 0 of provider 1"},
    ),
    Case(
        "never preempts non-preemptible work",
        nodes=[node(1, free=())],
        running=[alloc(100, on(1, range(8)), prio=1, preemptible=False)],
        queue=[job(1, prio=100)],
        want_pending={1: "lower-priority work is not preemptible"},
    ),
    Case(
        "never preempts equal priority",
        nodes=[node(1, free=())],
        running=[alloc(100, on(1, range(8)), prio=100)],
        queue=[job(1, prio=100)],
        want_pending={1: "expected to start by 1970-01-02 00:00 UTC"},
    ),
    Case(
        "never preempts higher priority",
        nodes=[node(1, free=())],
        running=[alloc(100, on(1, range(8)), prio=1000)],
        queue=[job(1, prio=100)],
        want_pending={1: "expected to start by 1970-01-02 00:00 UTC"},
    ),
    Case(
        "victims: lowest priority first",
        nodes=[node(1, free=()), node(2, free=())],
        running=[alloc(100, on(1, range(8)), prio=10), alloc(101, on(2, range(8)), prio=1)],
        queue=[job(1, prio=100)],
        want_preemptions={1: (101,)},
    ),
    Case(
        "victims: most recently started first",
        nodes=[node(1, free=()), node(2, free=())],
        running=[
            alloc(100, on(1, range(8)), started=100),
            alloc(101, on(2, range(8)), started=200),
        ],
        queue=[job(1, prio=100)],
        want_preemptions={1: (101,)},
    ),
    Case(
        "victims added until the gang fits, using free GPUs too",
        nodes=[node(1, free=(0, 1, 2, 3))],
        running=[
            alloc(100, on(1, [4, 5]), started=10),
            alloc(101, on(1, [6, 7]), started=20),
        ],
        queue=[job(1, prio=100)],
        want_preemptions={1: (100, 101)},
    ),
    Case(
        "victims that turn out unnecessary are not preempted",
        nodes=[node(1, free=()), node(2, free=())],
        running=[
            alloc(100, on(1, range(4)), prio=1),
            alloc(99, on(1, range(4, 8)), prio=5, preemptible=False),
            alloc(101, on(2, range(8)), prio=2),
        ],
        queue=[job(1, prio=100)],
        want_preemptions={1: (101,)},
    ),
    Case(
        "provider needing the fewest preempted GPUs",
        nodes=[
            node(1, provider=1, free=()),
            node(2, provider=2, level=C, free=(0, 1, 2, 3)),
        ],
        running=[
            alloc(100, on(1, range(8)), provider=1),
            alloc(101, on(2, range(4, 8)), provider=2),
        ],
        queue=[job(1, prio=100)],
        want_preemptions={1: (101,)},
    ),
    Case(
        "preemption stays within one provider",
        nodes=[node(1, provider=1, free=()), node(2, provider=2, free=())],
        running=[
            alloc(100, on(1, range(8)), provider=1),
            alloc(101, on(2, range(8)), provider=2),
        ],
        queue=[job(1, prio=100, workers=2)],
        want_pending={1: "a gang never spans providers"},
    ),
    Case(
        "a victim's GPUs serve only the job that preempted it",
        nodes=[node(1, free=())],
        running=[alloc(100, on(1, range(8)))],
        queue=[job(1, prio=100, gpus=4), job(2, prio=50, gpus=4)],
        want_preemptions={1: (100,)},
        want_pending={2: "preempting all lower-priority preemptible work would not make room"},
    ),
    Case(
        "free GPUs are used before anyone is preempted",
        nodes=[node(1, free=()), node(2, level=C)],
        running=[alloc(100, on(1, range(8)))],
        queue=[job(1, prio=100)],
        want_placements={1: {2: 8}},
    ),
    Case(
        "victims on non-matching nodes are not preempted",
        nodes=[node(1, model="A100-80GB", free=()), node(2, free=())],
        running=[
            alloc(100, on(1, range(8)), started=50),
            alloc(101, on(2, range(8)), started=10),
        ],
        queue=[job(1, prio=100, model="H100")],
        want_preemptions={1: (101,)},
    ),
]


def _check_invariants(
    decision: Decision,
    nodes: list[NodeView],
    running: list[RunningAllocation],
    queue: list[JobRequest],
    *,
    now_s: int = 1_000,
    config: PolicyConfig | None = DEFAULT_CONFIG,
) -> None:
    """What holds for every decision (the shared validator), plus ranks in order."""
    validate(decision, queue, nodes, running, now_s=now_s, config=config)
    jobs = {j.job_id: j for j in queue}
    for p in decision.placements:
        assert [w.rank for w in p.workers] == list(range(jobs[p.job_id].num_workers))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_schedule(case: Case) -> None:
    decision = schedule(case.queue, case.nodes, case.running, now_s=1_000)
    _check_invariants(decision, case.nodes, case.running, case.queue)

    got = {
        p.job_id: dict(Counter(n for w in p.workers for n in [w.node_id] * len(w.gpu_ids)))
        for p in decision.placements
    }
    assert got == case.want_placements
    for job_id, provider in case.want_providers.items():
        assert next(p.provider_id for p in decision.placements if p.job_id == job_id) == provider
    assert {p.job_id: p.victims for p in decision.preemptions} == case.want_preemptions
    for p in decision.placements:
        for node_id, ids in case.want_gpu_ids.get(p.job_id, {}).items():
            assert tuple(g for w in p.workers if w.node_id == node_id for g in w.gpu_ids) == ids
    for job_id, text in case.want_pending.items():
        assert text in decision.pending[job_id], decision.pending[job_id]
    if case.want_order is not None:
        assert [p.job_id for p in decision.placements] == case.want_order


def test_reasons_are_set_for_every_pending_job() -> None:
    for case in CASES:
        decision = schedule(case.queue, case.nodes, case.running, now_s=0)
        assert all(reason.strip() for reason in decision.pending.values()), case.name


def _random_cluster(
    seed: int, n_nodes: int, n_jobs: int
) -> tuple[list[NodeView], list[RunningAllocation], list[JobRequest]]:
    rng = random.Random(seed)
    nodes: list[NodeView] = []
    running: list[RunningAllocation] = []
    for node_id in range(n_nodes):
        provider = rng.randint(1, 4)
        busy = rng.randint(0, 8)
        nodes.append(
            node(
                node_id,
                provider=provider,
                level=rng.choice([R, C, S]),
                model=rng.choice(["H100-80GB", "A100-80GB"]),
                free=tuple(range(busy, 8)),
            )
        )
        if busy:
            running.append(
                alloc(
                    node_id,
                    on(node_id, range(busy)),
                    prio=rng.choice([1, 10, 100]),
                    preemptible=rng.random() < 0.7,
                    provider=provider,
                    started=rng.randint(0, 1000),
                )
            )
    queue = [
        job(
            j,
            prio=rng.choice([1, 10, 100, 1000]),
            seq=rng.randint(0, 10**6),
            workers=rng.choice([1, 1, 2, 4]),
            gpus=rng.choice([1, 2, 4, 8]),
            model=rng.choice([None, "H100", "A100"]),
        )
        for j in range(n_jobs)
    ]
    return nodes, running, queue


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_deterministic_and_independent_of_input_order(seed: int) -> None:
    nodes, running, queue = _random_cluster(seed, 60, 80)
    first = schedule(queue, nodes, running, now_s=5_000)
    _check_invariants(first, nodes, running, queue, now_s=5_000)
    rng = random.Random(seed + 100)
    for _ in range(3):
        shuffled = (rng.sample(queue, len(queue)), rng.sample(nodes, len(nodes)))
        again = schedule(shuffled[0], shuffled[1], rng.sample(running, len(running)), now_s=5_000)
        assert again == first
    assert first.placements, "the random cluster should allow some placements"
    assert first.preemptions, "and exercise preemption"


def test_inputs_are_not_mutated() -> None:
    nodes, running, queue = _random_cluster(7, 20, 30)
    before = (list(nodes), list(running), list(queue))
    schedule(queue, nodes, running, now_s=0)
    assert (nodes, running, queue) == before


# --- FIFO baseline -------------------------------------------------------------------


def test_fifo_head_of_line_blocking() -> None:
    nodes = [node(1, free=(0, 1, 2, 3))]
    queue = [job(1, gpus=8), job(2, gpus=4)]
    fifo = fifo_schedule(queue, nodes, [], now_s=0)
    assert fifo.placements == []
    assert "do not fit" in fifo.pending[1]
    assert fifo.pending[2] == "behind job 1 (strict FIFO)"
    # The real policy lets the small job through.
    assert [p.job_id for p in schedule(queue, nodes, [], now_s=0).placements] == [2]


def test_fifo_ignores_priority_level_and_never_preempts() -> None:
    nodes = [node(1, level=S), node(2, level=R, free=())]
    running = [alloc(100, on(2, range(8)), prio=1)]
    queue = [job(1, prio=1, seq=1), job(2, prio=1000, seq=2)]
    fifo = fifo_schedule(queue, nodes, running, now_s=0)
    assert [(p.job_id, p.workers[0].node_id) for p in fifo.placements] == [(1, 1)]
    assert not fifo.preemptions
    assert "behind job" not in fifo.pending[2]
    _check_invariants(fifo, nodes, running, queue, config=None)


def test_fifo_keeps_gangs_in_one_provider() -> None:
    nodes = [node(1, provider=1), node(2, provider=2), node(3, provider=2)]
    queue = [job(1, workers=2)]
    fifo = fifo_schedule(queue, nodes, [], now_s=0)
    assert [(p.provider_id, [w.node_id for w in p.workers]) for p in fifo.placements] == [
        (2, [2, 3])
    ]


@pytest.mark.parametrize("seed", [1, 2])
def test_fifo_invariants_on_random_clusters(seed: int) -> None:
    nodes, running, queue = _random_cluster(seed, 60, 80)
    decision = fifo_schedule(queue, nodes, running, now_s=0)
    _check_invariants(decision, nodes, running, queue, now_s=0, config=None)
    assert decision == fifo_schedule(list(reversed(queue)), nodes, running, now_s=0)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_deciding_the_tail_by_kind_changes_nothing(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long queue of few kinds of jobs: the per-kind shortcut gives exactly the decision
    of deciding every job one by one."""
    import scheduler.policy.placement as placement

    nodes, running, _ = _random_cluster(seed, 40, 0)
    rng = random.Random(seed)
    kinds = [
        (rng.choice([1, 10, 100]), rng.choice([1, 2]), rng.choice([2, 4, 8])) for _ in range(6)
    ]
    queue = []
    for j in range(600):
        prio, workers, gpus = rng.choice(kinds)
        queue.append(replace(job(j, prio=prio, workers=workers, gpus=gpus), submitted_s=4_000))
    fast = schedule(queue, nodes, running, now_s=5_000)
    monkeypatch.setattr(placement, "BULK_AFTER", 10**9)
    slow = schedule(queue, nodes, running, now_s=5_000)
    assert fast == slow
    assert len(fast.pending) > 500
