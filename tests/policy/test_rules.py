"""One table per rule of the policy: steering, agreement dates, provider fairness, backfill
with reservations, preemption that loses little, aging, the shared validator, the config.

Cases are (nodes, running, queue, config, providers) -> what must happen; every decision is
also checked by the validator the simulator and the live loop use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import pytest

from scheduler.domain.enums import CommitmentLevel
from scheduler.policy import (
    DEFAULT_CONFIG,
    Decision,
    InvalidDecision,
    JobRequest,
    NodeView,
    Placement,
    PolicyConfig,
    PolicyConfigError,
    Preemption,
    ProviderState,
    RunningAllocation,
    WorkerPlacement,
    first_fit_schedule,
    kueue_like_schedule,
    schedule,
    validate,
)
from tests.policy.test_placement import alloc, job, node, on

R, C, S = CommitmentLevel.reserved, CommitmentLevel.committed, CommitmentLevel.spot
NOW = 1_000_000  # 1970-01-12 13:46:40 UTC
HOUR = 3600


def ck_job(job_id: int, **kw: object) -> JobRequest:
    """``job()`` with the new fields: checkpointing, max_runtime_s, submitted_s, ..."""
    base = {k: kw.pop(k) for k in list(kw) if k in ("prio", "seq", "workers", "gpus", "model")}
    return replace(job(job_id, **base), **kw)  # type: ignore[arg-type]


def run(allocation_id: int, gpus: list[tuple[int, int]], **kw: object) -> RunningAllocation:
    base = {k: kw.pop(k) for k in list(kw) if k in ("prio", "preemptible", "provider", "started")}
    return replace(alloc(allocation_id, gpus, **base), **kw)  # type: ignore[arg-type]


@dataclass
class Rule:
    name: str
    nodes: list[NodeView]
    queue: list[JobRequest]
    running: list[RunningAllocation] = field(default_factory=list)
    config: PolicyConfig = DEFAULT_CONFIG
    providers: list[ProviderState] = field(default_factory=list)
    placed_on: dict[int, set[int]] = field(default_factory=dict)  # job -> node ids used
    preempts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    reserved_at: dict[int, int] = field(default_factory=dict)  # job -> start_s
    pending: dict[int, str] = field(default_factory=dict)  # job -> reason substring


def decide(rule: Rule) -> Decision:
    decision = schedule(
        rule.queue,
        rule.nodes,
        rule.running,
        now_s=NOW,
        providers=rule.providers,
        config=rule.config,
    )
    validate(decision, rule.queue, rule.nodes, rule.running, now_s=NOW, config=rule.config)
    return decision


RULES = [
    # --- commitment steering (config data, not code) ---------------------------------------
    Rule(
        "high work never runs on spot unless preemptible and checkpointing",
        nodes=[node(1, level=S)],
        queue=[ck_job(1, prio=100)],
        pending={1: "spot only for preemptible jobs that checkpoint"},
    ),
    Rule(
        "high work that checkpoints may use spot",
        nodes=[node(1, level=S)],
        queue=[ck_job(1, prio=100, checkpointing=True)],
        placed_on={1: {1}},
    ),
    Rule(
        "high work prefers reserved, then committed",
        nodes=[node(1, provider=1, level=S), node(2, provider=2, level=C), node(3, provider=3)],
        queue=[ck_job(1, prio=100, checkpointing=True), ck_job(2, prio=100, checkpointing=True)],
        placed_on={1: {3}, 2: {2}},
    ),
    Rule(
        "low work prefers spot",
        nodes=[
            node(1, provider=1, level=R),
            node(2, provider=2, level=C),
            node(3, provider=3, level=S),
        ],
        queue=[ck_job(1, prio=1), ck_job(2, prio=1)],
        placed_on={1: {3}, 2: {2}},
    ),
    Rule(
        "steering is configuration: low work confined to spot",
        nodes=[node(1, level=R)],
        queue=[ck_job(1, prio=1)],
        config=PolicyConfig.from_mapping({"steering": {"low": ["spot"]}}),
        pending={1: "no ready node"},
    ),
    # --- agreements have a start and an end ----------------------------------------------------
    Rule(
        "no placement on an agreement that has ended",
        nodes=[
            replace(node(1, provider=1), agreement_ends_s=NOW - 1),
            replace(node(2, provider=2, level=C), agreement_ends_s=NOW + HOUR),
        ],
        queue=[ck_job(1)],
        placed_on={1: {2}},
    ),
    # --- fairness to providers -----------------------------------------------------------------
    Rule(
        "among equal choices, the provider furthest behind its commitment",
        nodes=[node(1, provider=1, level=C), node(2, provider=2, level=C)],
        queue=[ck_job(1)],
        providers=[ProviderState(1, 1000, 900), ProviderState(2, 1000, 400)],
        placed_on={1: {2}},
    ),
    Rule(
        "fairness never beats the job's level preference",
        nodes=[node(1, provider=1, level=R), node(2, provider=2, level=C)],
        queue=[ck_job(1)],
        providers=[ProviderState(1, 1000, 1000), ProviderState(2, 1000, 0)],
        placed_on={1: {1}},
    ),
    Rule(
        "fairness off: ties go to the lowest provider id",
        nodes=[node(1, provider=1, level=C), node(2, provider=2, level=C)],
        queue=[ck_job(1)],
        providers=[ProviderState(1, 1000, 900), ProviderState(2, 1000, 400)],
        config=replace(DEFAULT_CONFIG, fairness=False),
        placed_on={1: {1}},
    ),
    Rule(
        "levels grouped as equals in the steering: fairness decides between them",
        nodes=[node(1, provider=1, level=R), node(2, provider=2, level=C)],
        queue=[ck_job(1)],
        providers=[ProviderState(1, 1000, 1000), ProviderState(2, 1000, 0)],
        config=PolicyConfig.from_mapping({"steering": {"normal": [["reserved", "committed"]]}}),
        placed_on={1: {2}},
    ),
    # --- backfill with reservations ------------------------------------------------------------
    Rule(
        "the head that does not fit gets a reservation from the running jobs' ends",
        nodes=[node(1, free=(0, 1, 2, 3))],
        running=[
            run(100, on(1, range(4, 8)), prio=50, started=NOW - HOUR, expected_end_s=NOW + HOUR)
        ],
        queue=[ck_job(1, prio=10)],
        reserved_at={1: NOW + HOUR},
        pending={1: "expected to start by 14:46 UTC on site 0 of provider 1"},
    ),
    Rule(
        "a lower job backfills only if it ends before the reservation",
        nodes=[node(1, free=(0, 1, 2, 3))],
        running=[
            run(100, on(1, range(4, 8)), prio=50, started=NOW - HOUR, expected_end_s=NOW + HOUR)
        ],
        queue=[
            ck_job(1, prio=10),
            ck_job(2, prio=1, gpus=4, max_runtime_s=4 * HOUR),
            ck_job(3, prio=1, gpus=4, max_runtime_s=HOUR // 2),
        ],
        reserved_at={1: NOW + HOUR, 2: NOW + 25 * HOUR},  # job 2 reserves behind job 1
        placed_on={3: {1}},
    ),
    Rule(
        "past the reservation depth, a job that would delay a reservation is told so",
        nodes=[node(1, free=(0, 1, 2, 3))],
        running=[
            run(100, on(1, range(4, 8)), prio=50, started=NOW - HOUR, expected_end_s=NOW + HOUR)
        ],
        queue=[ck_job(1, prio=10), ck_job(2, prio=1, gpus=4, max_runtime_s=4 * HOUR)],
        config=replace(DEFAULT_CONFIG, reservation_depth=1),
        reserved_at={1: NOW + HOUR},
        pending={2: "held for higher-priority jobs that start before it would end"},
    ),
    Rule(
        "a reservation beyond the backfill window is a forecast and holds nothing",
        nodes=[node(1, free=(0, 1, 2, 3))],
        running=[
            run(
                100, on(1, range(4, 8)), prio=50, started=NOW - HOUR, expected_end_s=NOW + 10 * HOUR
            )
        ],
        queue=[ck_job(1, prio=10), ck_job(2, prio=1, gpus=4, max_runtime_s=20 * HOUR)],
        reserved_at={1: NOW + 10 * HOUR},
        placed_on={2: {1}},
    ),
    Rule(
        "running work without max_runtime is expected to run the documented default",
        nodes=[node(1, free=())],
        running=[run(100, on(1, range(8)), prio=50, started=NOW - HOUR)],
        queue=[ck_job(1, prio=10)],
        reserved_at={1: NOW - HOUR + DEFAULT_CONFIG.default_runtime_s},
    ),
    Rule(
        "two reservations never count on the same released GPUs",
        nodes=[node(1, free=())],
        running=[run(100, on(1, range(8)), prio=50, started=NOW - HOUR, expected_end_s=NOW + HOUR)],
        queue=[ck_job(1, prio=10, max_runtime_s=2 * HOUR), ck_job(2, prio=10)],
        reserved_at={1: NOW + HOUR, 2: NOW + 3 * HOUR},
    ),
    # --- aging ---------------------------------------------------------------------------------
    Rule(
        "a job waiting longer than starving_after_s reserves even past the reservation depth",
        nodes=[node(1, free=())],
        running=[run(100, on(1, range(8)), prio=50, started=NOW - HOUR, expected_end_s=NOW + HOUR)],
        queue=[
            ck_job(1, prio=10, submitted_s=NOW - 60),
            ck_job(2, prio=10, submitted_s=NOW - 7 * HOUR),
        ],
        config=replace(DEFAULT_CONFIG, reservation_depth=0, starving_after_s=6 * HOUR),
        reserved_at={2: NOW + HOUR},
    ),
    # --- preemption that loses little ----------------------------------------------------------
    Rule(
        "never before the minimum runtime",
        nodes=[node(1, free=())],
        running=[run(100, on(1, range(8)), started=NOW - 300)],
        queue=[ck_job(1, prio=100)],
        pending={1: "has run less than the minimum runtime (10 min)"},
    ),
    Rule(
        "victims chosen by the work they would lose since their last checkpoint",
        nodes=[node(1, free=()), node(2, free=())],
        running=[
            run(100, on(1, range(8)), started=NOW - 10 * HOUR, last_checkpoint_s=NOW - 60),
            run(101, on(2, range(8)), started=NOW - 2 * HOUR),
        ],
        queue=[ck_job(1, prio=100)],
        preempts={1: (100,)},
        pending={1: "they lose 0.13 GPU-h since their last checkpoint"},
    ),
    Rule(
        "victim_order priority (Kueue's): lowest priority first, whatever it loses",
        nodes=[node(1, free=()), node(2, free=())],
        running=[
            run(100, on(1, range(8)), prio=5, started=NOW - 10 * HOUR, last_checkpoint_s=NOW - 60),
            run(101, on(2, range(8)), prio=1, started=NOW - 2 * HOUR),
        ],
        queue=[ck_job(1, prio=100)],
        config=replace(DEFAULT_CONFIG, victim_order="priority"),
        preempts={1: (101,)},
    ),
    Rule(
        "the gain must exceed the loss by the configured factor",
        nodes=[node(1, free=())],
        running=[run(100, on(1, range(8)), started=NOW - 10 * HOUR, expected_end_s=NOW + 1800)],
        queue=[ck_job(1, prio=100)],
        reserved_at={1: NOW + 1800},
        pending={1: "preempting would lose 80.0 GPU-h of work for 4.00 GPU-h of waiting spared"},
    ),
    Rule(
        "a factor of 0 preempts whenever it makes room",
        nodes=[node(1, free=())],
        running=[run(100, on(1, range(8)), started=NOW - 10 * HOUR, expected_end_s=NOW + 1800)],
        queue=[ck_job(1, prio=100)],
        config=replace(DEFAULT_CONFIG, preempt_gain_factor=Fraction(0)),
        preempts={1: (100,)},
    ),
    Rule(
        "no preemption when the job starts as soon by waiting out the grace period",
        nodes=[node(1, free=())],
        running=[run(100, on(1, range(8)), started=NOW - HOUR, expected_end_s=NOW + 20)],
        queue=[ck_job(1, prio=100)],
        reserved_at={1: NOW + 20},
    ),
    Rule(
        "a job whose victims are stopping waits for them, and preempts no one else",
        nodes=[node(1, free=()), node(2, free=())],
        running=[
            run(
                100,
                on(1, range(8)),
                started=NOW - HOUR,
                stopping_until_s=NOW + 25,
                stopping_for_job=1,
            ),
            run(101, on(2, range(8)), started=NOW - HOUR),
        ],
        queue=[ck_job(1, prio=100)],
        reserved_at={1: NOW + 25},
        pending={1: "waiting for preempted job 1100 to checkpoint and stop"},
    ),
    Rule(
        "a stopping allocation is never a victim again",
        nodes=[node(1, free=())],
        running=[
            run(
                100,
                on(1, range(8)),
                started=NOW - HOUR,
                stopping_until_s=NOW + 25,
                stopping_for_job=7,
            )
        ],
        queue=[ck_job(1, prio=100)],
        reserved_at={1: NOW + 25},
    ),
    Rule(
        "at most max_preemptions_per_cycle preemptions in one cycle",
        nodes=[node(1, free=()), node(2, free=())],
        running=[
            run(100, on(1, range(8)), started=NOW - HOUR),
            run(101, on(2, range(8)), started=NOW - HOUR),
        ],
        queue=[ck_job(1, prio=100), ck_job(2, prio=100)],
        config=replace(DEFAULT_CONFIG, max_preemptions_per_cycle=1),
        preempts={1: (101,)},  # equal loss and age: the newer allocation
        pending={2: "this cycle's preemption limit is reached"},
    ),
    Rule(
        "preemption off",
        nodes=[node(1, free=())],
        running=[run(100, on(1, range(8)), started=NOW - HOUR)],
        queue=[ck_job(1, prio=100)],
        config=replace(DEFAULT_CONFIG, preemption=False),
        reserved_at={1: NOW - HOUR + DEFAULT_CONFIG.default_runtime_s},
    ),
]


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_rule(rule: Rule) -> None:
    decision = decide(rule)
    got = {p.job_id: {w.node_id for w in p.workers} for p in decision.placements}
    assert got == rule.placed_on, decision.pending
    assert {p.job_id: p.victims for p in decision.preemptions} == rule.preempts
    for job_id, start in rule.reserved_at.items():
        assert decision.reservations[job_id].start_s == start, decision.pending[job_id]
    for job_id, text in rule.pending.items():
        assert text in decision.pending[job_id], decision.pending[job_id]


def test_preemption_gives_the_victims_a_grace_period() -> None:
    rule = RULES[[r.name for r in RULES].index("a factor of 0 preempts whenever it makes room")]
    (pre,) = decide(rule).preemptions
    assert pre.deadline_s == NOW + DEFAULT_CONFIG.preempt_grace_s
    assert pre.lost_gpu_s == 8 * 10 * HOUR
    assert "by 13:47:10 UTC" in decide(rule).pending[1]


def test_victims_gpus_are_held_for_the_preempting_job() -> None:
    """Free GPUs a preemption counts on are not handed to a lower job meanwhile."""
    nodes = [node(1, free=(0, 1, 2, 3))]
    running = [run(100, on(1, range(4, 8)), started=NOW - HOUR)]
    queue = [ck_job(1, prio=100), ck_job(2, prio=50, gpus=4)]
    decision = schedule(queue, nodes, running, now_s=NOW)
    assert [p.victims for p in decision.preemptions] == [(100,)]
    assert not decision.placements


# --- the shared validator catches every broken rule ---------------------------------------------
def _bad(decision: Decision, queue: list[JobRequest], nodes: list[NodeView], running=()) -> str:
    with pytest.raises(InvalidDecision) as err:
        validate(decision, queue, nodes, list(running), now_s=NOW, config=DEFAULT_CONFIG)
    return str(err.value)


def test_validator_catches_broken_decisions() -> None:
    nodes = [node(1, free=(0, 1)), replace(node(2, level=S), agreement_ends_s=NOW - 1)]
    queue = [ck_job(1, prio=100, gpus=2), ck_job(2, gpus=2)]

    def placed(job_id: int, node_id: int, gpus: tuple[int, ...]) -> Placement:
        return Placement(job_id, 1, (WorkerPlacement(0, node_id, gpus),))

    twice = Decision(placements=[placed(1, 1, (0, 1)), placed(2, 1, (0, 1))])
    assert "used twice" in _bad(twice, queue, nodes)
    assert "neither placed nor pending" in _bad(
        Decision(placements=[placed(1, 1, (0, 1))]), queue, nodes
    )
    ended = Decision(placements=[placed(2, 2, (0, 1))], pending={1: "x"})
    assert "agreement has ended" in _bad(ended, queue, nodes)
    spot = Decision(placements=[placed(1, 2, (0, 1))], pending={2: "x"})
    assert "spot capacity is not for its class" in _bad(spot, queue, nodes)
    busy = Decision(
        placements=[Placement(1, 1, (WorkerPlacement(0, 1, (5, 6)),))], pending={2: "x"}
    )
    assert "is not free" in _bad(busy, queue, nodes)
    higher = run(100, on(1, range(2, 8)), prio=500, started=NOW - HOUR)
    bad_victim = Decision(
        pending={1: "x", 2: "x"},
        preemptions=[Preemption(1, 1, 0, (100,), NOW + 30, 0, 0)],
    )
    assert "may not be preempted by it" in _bad(bad_victim, queue, nodes, [higher])


# --- the config is data --------------------------------------------------------------------------
def test_config_round_trips_through_a_file(tmp_path: Path) -> None:
    config = replace(DEFAULT_CONFIG, min_runtime_s=120, preempt_gain_factor=Fraction(3, 2))
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(config.to_dict()))
    assert PolicyConfig.from_file(path) == config
    yaml_path = tmp_path / "policy.yaml"
    yaml_path.write_text("steering:\n  low: [spot, committed]\npreempt_grace_s: 90\n")
    loaded = PolicyConfig.from_file(yaml_path)
    assert loaded.preempt_grace_s == 90
    tied = PolicyConfig.from_mapping({"steering": {"normal": [["reserved", "committed"], "spot"]}})
    assert tied.to_dict()["steering"]["normal"]["levels"] == [["reserved", "committed"], "spot"]
    assert PolicyConfig.from_mapping(tied.to_dict()) == tied
    assert [lv.value for lv in loaded.steering[next(iter(loaded.steering))].levels]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"min_runtime": 5}, "unknown policy setting min_runtime; known:"),
        ({"min_runtime_s": -1}, "min_runtime_s must be a whole number >= 0"),
        ({"preemption": "yes"}, "preemption must be true or false"),
        ({"preempt_gain_factor": "lots"}, "preempt_gain_factor must be a number"),
        ({"victim_order": "random"}, "victim_order is loss or priority"),
        ({"steering": {"urgent": ["spot"]}}, "unknown priority class 'urgent'"),
        ({"steering": {"low": ["cheap"]}}, "unknown commitment level 'cheap'"),
        ({"steering": {"low": []}}, "must list distinct levels"),
    ],
)
def test_config_refuses_bad_settings(data: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message.replace("(", r"\(")):
        PolicyConfig.from_mapping(data)


# --- baselines -----------------------------------------------------------------------------------
def test_kueue_like_preempts_by_priority_with_no_minimum_runtime() -> None:
    nodes = [node(1, free=()), node(2, free=())]
    running = [
        run(100, on(1, range(8)), prio=5, started=NOW - 60, last_checkpoint_s=NOW - 10),
        run(101, on(2, range(8)), prio=1, started=NOW - 60),
    ]
    queue = [ck_job(1, prio=100)]
    decision = kueue_like_schedule(queue, nodes, running, now_s=NOW)
    assert [p.victims for p in decision.preemptions] == [(101,)]
    assert not schedule(queue, nodes, running, now_s=NOW).preemptions  # ours: too young


def test_first_fit_lets_small_jobs_past_and_never_preempts() -> None:
    nodes = [node(1, free=(0, 1, 2, 3))]
    running = [run(100, on(1, range(4, 8)), started=NOW - HOUR)]
    queue = [ck_job(1, prio=100), ck_job(2, prio=1, gpus=4)]
    decision = first_fit_schedule(queue, nodes, running, now_s=NOW)
    assert [p.job_id for p in decision.placements] == [2]
    assert not decision.preemptions
    validate(decision, queue, nodes, running, now_s=NOW)
