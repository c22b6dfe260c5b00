"""Value types exchanged between a scheduling policy and its callers.

The live scheduler loop, the trace-replay simulator and the benchmarks all build these from
their own state and hand them to a policy function, so the types carry plain values only
(no ORM rows, no Ray handles). Every type is a frozen, slotted dataclass: a policy must
never mutate what it was given, and the caller may reuse the same views across cycles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.domain.enums import CommitmentLevel


@dataclass(frozen=True, slots=True)
class NodeView:
    """One schedulable node as the policy sees it.

    Invariants: the caller passes only ready nodes, and only GPUs that are healthy;
    ``free_gpu_ids`` is a subset of the node's GPUs that no open allocation holds, so
    ``len(free_gpu_ids) <= total_gpus``. GPU ids are opaque integers. ``site_id`` names the
    Ray cluster the node belongs to (0: the provider's only site); a gang never spans sites.
    """

    node_id: int
    name: str
    provider_id: int
    level: CommitmentLevel
    gpu_model: str  # canonical, e.g. "H100-80GB"
    gpu_memory_bytes: int  # per GPU
    free_gpu_ids: tuple[int, ...]
    total_gpus: int
    site_id: int = 0

    @property
    def site_key(self) -> tuple[int, int]:
        """(provider, site): the boundary no gang crosses."""
        return (self.provider_id, self.site_id)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A gang waiting to be placed: ``num_workers`` workers of ``gpus_per_worker`` GPUs each.

    ``seq`` is the submission order; it breaks ties between jobs of equal priority (FIFO).
    ``preemptible`` says whether the job, once running, may itself be preempted; it plays
    no part in placing the job.
    """

    job_id: int
    priority: int
    seq: int
    num_workers: int
    gpus_per_worker: int
    gpu_model: str | None = None
    min_gpu_memory_bytes: int | None = None
    preemptible: bool = True


@dataclass(frozen=True, slots=True)
class RunningAllocation:
    """GPUs held by a running gang; the set of potential preemption victims.

    Invariant: all ``gpus`` lie on nodes of one site of ``provider_id`` (a gang never
    spans sites).
    """

    allocation_id: int
    job_id: int
    priority: int
    preemptible: bool
    provider_id: int
    started_at_s: int
    gpus: tuple[tuple[int, int], ...]  # (node_id, gpu_id)
    site_id: int = 0

    @property
    def site_key(self) -> tuple[int, int]:
        return (self.provider_id, self.site_id)


@dataclass(frozen=True, slots=True)
class WorkerPlacement:
    """Where one worker of a gang runs: ``gpu_ids`` all on the single node ``node_id``."""

    rank: int
    node_id: int
    gpu_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Placement:
    """A decision to start one gang.

    Invariants: every worker lies on a node of site ``site_id`` of ``provider_id``;
    ``preempts`` lists the allocation ids the caller must end before starting the workers
    (empty when the gang fits on free GPUs).
    """

    job_id: int
    provider_id: int
    workers: tuple[WorkerPlacement, ...]
    preempts: tuple[int, ...] = ()
    site_id: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one scheduling cycle.

    Every queued job appears exactly once: either in ``placements`` or as a key of
    ``pending`` with a human-readable reason. Frozen like the other types; the list and
    dict are built by the policy and should be treated as read-only by callers.
    """

    placements: list[Placement] = field(default_factory=list)
    pending: dict[int, str] = field(default_factory=dict)


class PolicyFn(Protocol):
    """The signature shared by ``schedule`` and ``fifo_schedule``."""

    def __call__(
        self,
        queue: Sequence[JobRequest],
        nodes: Sequence[NodeView],
        running: Sequence[RunningAllocation],
        *,
        now_s: int,
    ) -> Decision: ...
