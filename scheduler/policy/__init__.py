"""Pure scheduling policies: from (queue, nodes, running allocations) to a Decision.

Nothing in this package touches a database, Ray or the clock; the live loop, the
simulator (``scheduler.sim``) and the benchmarks all call the same functions, and
``validate`` checks any policy's decision against the rules no policy may break.
"""

from scheduler.policy.baselines import fifo_schedule, first_fit_schedule, kueue_like_schedule
from scheduler.policy.config import DEFAULT_CONFIG, PolicyConfig, PolicyConfigError
from scheduler.policy.placement import queue_key, schedule
from scheduler.policy.types import (
    Decision,
    JobRequest,
    NodeView,
    Placement,
    PolicyFn,
    Preemption,
    ProviderState,
    Reservation,
    RunningAllocation,
    WorkerPlacement,
)
from scheduler.policy.validate import InvalidDecision, validate

POLICIES: dict[str, PolicyFn] = {
    "andromeda": schedule,
    "fifo": fifo_schedule,
    "first-fit": first_fit_schedule,
    "kueue-like": kueue_like_schedule,
}

__all__ = [
    "DEFAULT_CONFIG",
    "POLICIES",
    "Decision",
    "InvalidDecision",
    "JobRequest",
    "NodeView",
    "Placement",
    "PolicyConfig",
    "PolicyConfigError",
    "PolicyFn",
    "Preemption",
    "ProviderState",
    "Reservation",
    "RunningAllocation",
    "WorkerPlacement",
    "fifo_schedule",
    "first_fit_schedule",
    "kueue_like_schedule",
    "queue_key",
    "schedule",
    "validate",
]
