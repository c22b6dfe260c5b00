"""Pure scheduling policies: from (queue, nodes, running allocations) to a Decision.

Nothing in this package touches a database, Ray or the clock; the live loop, the
simulator (``scheduler.sim``) and the benchmarks all call the same functions.
"""

from scheduler.policy.fifo import fifo_schedule
from scheduler.policy.placement import queue_key, schedule
from scheduler.policy.types import (
    Decision,
    JobRequest,
    NodeView,
    Placement,
    PolicyFn,
    RunningAllocation,
    WorkerPlacement,
)

__all__ = [
    "Decision",
    "JobRequest",
    "NodeView",
    "Placement",
    "PolicyFn",
    "RunningAllocation",
    "WorkerPlacement",
    "fifo_schedule",
    "queue_key",
    "schedule",
]
