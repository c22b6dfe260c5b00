"""Value types exchanged between a scheduling policy and its callers.

The live scheduler loop, the trace-replay simulator and the benchmarks all build these from
their own state and hand them to a policy function, so the types carry plain values only
(no ORM rows, no Ray handles). Every type is a frozen, slotted dataclass: a policy must
never mutate what it was given, and the caller may reuse the same views across cycles.
Times are integer Unix seconds (the simulator's own clock in a replay).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.domain.enums import CommitmentLevel


@dataclass(frozen=True, slots=True)
class NodeView:
    """One schedulable node as the policy sees it.

    Invariants: the caller passes only nodes that may take new work now (ready, fresh, not
    draining, on an agreement in force), and only GPUs that are healthy; ``free_gpu_ids``
    is a subset of the node's GPUs that no allocation holds, so ``len(free_gpu_ids) <=
    total_gpus``. GPU ids are opaque integers. ``site_id`` names the Ray cluster the node
    belongs to (0: the provider's only site); a gang never spans sites. ``agreement_ends_s``
    is when the node's agreement ends (None: open-ended): no placement is made on a node
    whose agreement has ended.
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
    site_name: str = ""
    agreement_ends_s: int | None = None

    @property
    def site_key(self) -> tuple[int, int]:
        """(provider, site): the boundary no gang crosses."""
        return (self.provider_id, self.site_id)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A gang waiting to be placed: ``num_workers`` workers of ``gpus_per_worker`` GPUs each.

    ``seq`` is the submission order; it breaks ties between jobs of equal priority (FIFO).
    ``preemptible`` says whether the job, once running, may itself be preempted, and
    ``checkpointing`` that it saves checkpoints it can resume from (both decide whether
    the job may run on spot capacity, see :mod:`scheduler.policy.config`).
    ``max_runtime_s`` bounds its run (it is stopped after it): reservations and backfill
    use it as the job's expected duration. ``submitted_s`` is when it first queued (aging).
    """

    job_id: int
    priority: int
    seq: int
    num_workers: int
    gpus_per_worker: int
    gpu_model: str | None = None
    min_gpu_memory_bytes: int | None = None
    preemptible: bool = True
    checkpointing: bool = False
    max_runtime_s: int | None = None
    submitted_s: int | None = None
    team: str = ""
    # Twice the id of this job's kind: the fields every rule of the policy reads (shape,
    # constraints, priority, preemptible, checkpointing, max_runtime). Jobs of one kind are
    # decided alike, so the policy decides a long queue per kind. Not compared.
    kind2: int = field(init=False, compare=False, repr=False, default=0)
    # (-priority, seq, job_id) packed into one int (queue order sorts on ints, in C).
    order: int = field(init=False, compare=False, repr=False, default=0)

    def __post_init__(self) -> None:
        key = (
            self.gpu_model,
            self.min_gpu_memory_bytes,
            self.gpus_per_worker,
            self.num_workers,
            self.priority,
            self.preemptible,
            self.checkpointing,
            self.max_runtime_s,
        )
        kind = _KINDS.get(key)
        if kind is None:
            kind = _KINDS.setdefault(key, next(_KIND_IDS))
        object.__setattr__(self, "kind2", 2 * kind)
        if not (-_HALF <= self.seq < _HALF and -_HALF <= self.job_id < _HALF):
            raise ValueError("seq and job_id must lie in [-2**63, 2**63)")
        object.__setattr__(
            self,
            "order",
            ((-self.priority) << 130) + ((self.seq + _HALF) << 65) + (self.job_id + _HALF),
        )

    @property
    def num_gpus(self) -> int:
        return self.num_workers * self.gpus_per_worker


# Process-wide interning of job kinds (ids are only ever compared for equality).
_KINDS: dict[tuple[object, ...], int] = {}
_KIND_IDS = itertools.count()
_HALF = 2**63  # seq and job_id lie in [-2**63, 2**63): each packs into 65 bits


@dataclass(frozen=True, slots=True)
class RunningAllocation:
    """GPUs held by a gang: running, starting, or stopping.

    Invariant: all ``gpus`` lie on nodes of one site of ``provider_id`` (a gang never
    spans sites). ``running_since_s`` is when every worker ran (None: as ``started_at_s``);
    ``last_checkpoint_s`` its latest reported checkpoint (None: none yet), so a preemption
    loses the GPU-seconds since then. ``expected_end_s`` is ``started + max_runtime`` when
    the job has one (None: estimated, :meth:`PolicyConfig.expected_end`).
    ``stopping_until_s`` is set while the allocation has been asked to stop (preempted,
    reclaimed) and says by when its GPUs are free; ``stopping_for_job`` names the job it
    makes room for. A stopping allocation is never a victim again.
    """

    allocation_id: int
    job_id: int
    priority: int
    preemptible: bool
    provider_id: int
    started_at_s: int
    gpus: tuple[tuple[int, int], ...]  # (node_id, gpu_id)
    site_id: int = 0
    running_since_s: int | None = None
    last_checkpoint_s: int | None = None
    expected_end_s: int | None = None
    stopping_until_s: int | None = None
    stopping_for_job: int | None = None

    @property
    def site_key(self) -> tuple[int, int]:
        return (self.provider_id, self.site_id)

    @property
    def since_s(self) -> int:
        return self.started_at_s if self.running_since_s is None else self.running_since_s


@dataclass(frozen=True, slots=True)
class ProviderState:
    """How far a provider's commitment has been met in the current period: the GPU-seconds
    its agreements commit up to now (pro rata) and those it delivered. Fairness prefers the
    provider furthest behind (lowest ``delivered / target``)."""

    provider_id: int
    target_gpu_s: int
    delivered_gpu_s: int


@dataclass(frozen=True, slots=True)
class WorkerPlacement:
    """Where one worker of a gang runs: ``gpu_ids`` all on the single node ``node_id``."""

    rank: int
    node_id: int
    gpu_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Placement:
    """A decision to start one gang now, on free GPUs only.

    Invariant: every worker lies on a node of site ``site_id`` of ``provider_id``.
    """

    job_id: int
    provider_id: int
    workers: tuple[WorkerPlacement, ...]
    site_id: int = 0


@dataclass(frozen=True, slots=True)
class Preemption:
    """A decision to stop ``victims`` (allocation ids, all in one site) so that ``job_id``
    can start there once their GPUs are free. The caller asks them to stop with a grace
    period ending at ``deadline_s``; the job stays queued meanwhile."""

    job_id: int
    provider_id: int
    site_id: int
    victims: tuple[int, ...]
    deadline_s: int
    lost_gpu_s: int  # the GPU-seconds the victims lose since their last checkpoint
    gain_gpu_s: int  # the GPU-seconds of waiting the job is spared


@dataclass(frozen=True, slots=True)
class Reservation:
    """Where and when a job that does not fit now is expected to start; lower jobs may use
    the GPUs it counts on only if they are expected to end by ``start_s``."""

    job_id: int
    provider_id: int
    site_id: int
    start_s: int
    site_name: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one scheduling cycle.

    Every queued job appears exactly once: either in ``placements`` or as a key of
    ``pending`` with a human-readable reason (a job in ``preemptions`` or
    ``reservations`` is pending too). The lists and dicts are built by the policy and
    should be treated as read-only by callers.
    """

    placements: list[Placement] = field(default_factory=list)
    pending: dict[int, str] = field(default_factory=dict)
    preemptions: list[Preemption] = field(default_factory=list)
    reservations: dict[int, Reservation] = field(default_factory=dict)


class PolicyFn(Protocol):
    """The signature shared by every policy (``schedule`` and the baselines)."""

    def __call__(
        self,
        queue: Sequence[JobRequest],
        nodes: Sequence[NodeView],
        running: Sequence[RunningAllocation],
        *,
        now_s: int,
        providers: Sequence[ProviderState] = (),
    ) -> Decision: ...
