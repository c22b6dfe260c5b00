"""The execution backend interface, as the scheduler loop sees it.

The loop decides; the backend only carries decisions out and reports what it sees. Every
call is keyed by allocation id and must be idempotent: the loop may call ``stop`` for an
allocation the backend no longer knows, and ``poll`` for one it lost after a restart
(answered with ``unknown``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WorkerLaunch:
    rank: int
    node_name: str
    gpu_uuids: tuple[str, ...]
    local_rank: int


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one allocation's workers."""

    allocation_id: int
    job_id: int
    job_name: str
    entrypoint: str
    workers: tuple[WorkerLaunch, ...]
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    checkpoint_uri: str | None = None


class Phase(StrEnum):
    starting = "starting"  # reserving the placement group or starting workers
    running = "running"
    succeeded = "succeeded"
    failed = "failed"  # the entrypoint failed (a rank exited non-zero), or Ray refused
    lost = "lost"  # a worker died with its node or process, not by the entrypoint's exit
    unknown = "unknown"  # the backend has no record of the allocation


@dataclass(frozen=True, slots=True)
class AllocationState:
    phase: Phase
    error: str | None = None


class BackendError(Exception):
    """The backend could not carry out a request (cluster unreachable, bad launch)."""


class ExecutionBackend(Protocol):
    def start(self, launch: Launch) -> None:
        """Begin reserving and starting; returns quickly, progress shows in ``poll``."""

    def poll(self, allocation_id: int) -> AllocationState: ...

    def stop(self, allocation_id: int) -> dict[int, str]:
        """Stop the workers and free the reservation; no error if already gone.

        Returns rank -> the tail of that worker's output, collected just before the stop
        (empty when the backend had nothing running for the allocation)."""

    def logs(self, allocation_id: int) -> dict[int, str]:
        """Rank -> the tail of that worker's output; empty when unknown."""

    def active(self) -> set[int]:
        """Allocation ids the backend is holding resources for."""

    def close(self) -> None: ...
