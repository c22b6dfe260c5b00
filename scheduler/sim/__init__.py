"""Trace-replay simulation of scheduling policies (no database, no Ray).

The simulator drives the same pure policy functions as the live loop, on a fixed simulated
fleet, so policy changes can be measured on real traces (Philly, or any trace in the
generic CSV format of ``scheduler.sim.traces``) before they ship.
"""

from scheduler.sim.philly import default_trace_path, load_philly, priority_class
from scheduler.sim.replay import (
    InvalidDecision,
    JobOutcome,
    NodeSpec,
    ReplayResult,
    TraceJob,
    build_cluster,
    percentile,
    replay,
)

__all__ = [
    "InvalidDecision",
    "JobOutcome",
    "NodeSpec",
    "ReplayResult",
    "TraceJob",
    "build_cluster",
    "default_trace_path",
    "load_philly",
    "percentile",
    "priority_class",
    "replay",
]
