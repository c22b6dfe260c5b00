"""An in-memory backend for unit tests of the loop. Integration tests use ``RayBackend``."""

from __future__ import annotations

from scheduler.backends.base import AllocationState, BackendError, Launch, Phase


class FakeBackend:
    def __init__(self) -> None:
        self.launches: dict[int, Launch] = {}
        self.states: dict[int, AllocationState] = {}
        self.stopped: list[int] = []
        self.fail_start: set[int] = set()

    def start(self, launch: Launch) -> None:
        if launch.job_id in self.fail_start:
            raise BackendError(f"cannot start job {launch.job_id}")
        self.launches[launch.allocation_id] = launch
        self.states[launch.allocation_id] = AllocationState(Phase.running)

    def finish(self, allocation_id: int, *, ok: bool = True, error: str | None = None) -> None:
        self.states[allocation_id] = AllocationState(Phase.succeeded if ok else Phase.failed, error)

    def lose(self, allocation_id: int, error: str = "ActorDiedError: node died") -> None:
        """The workers died with their node (not by the entrypoint's exit)."""
        self.states[allocation_id] = AllocationState(Phase.lost, error)

    def poll(self, allocation_id: int) -> AllocationState:
        return self.states.get(allocation_id, AllocationState(Phase.unknown))

    def stop(self, allocation_id: int) -> dict[int, str]:
        if allocation_id not in self.states:
            return {}
        logs = self.logs(allocation_id)
        self.stopped.append(allocation_id)
        self.states.pop(allocation_id, None)
        return logs

    def logs(self, allocation_id: int) -> dict[int, str]:
        launch = self.launches.get(allocation_id)
        return {w.rank: f"rank {w.rank} output\n" for w in launch.workers} if launch else {}

    def active(self) -> set[int]:
        return set(self.states)

    def close(self) -> None:
        self.states.clear()
