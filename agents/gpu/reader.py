"""What a node agent knows about its GPUs, independent of where the numbers come from.

The agent reads GPUs through one small interface so that the same code runs against real
NVML (``NvmlReader``), a replay of real recordings (``NvmlReader(RecordedNvml(...))``) and a
simulated host without GPUs (``SimulatedReader``). Everything above this layer only ever sees
``GpuInfo`` and ``GpuSample``.

Invariant shared by every reader: ``None`` in a sample means "unknown / not supported by this
GPU or driver" and is never replaced by zero, because a zero would be read as a measurement
(0 % utilisation, 0 W) and could wrongly mark a busy GPU idle or a broken one healthy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from scheduler.domain.enums import GpuHealth


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Static inventory of one GPU, read once when the agent starts.

    ``uuid`` is the stable identity the scheduler keys on (indices can change across reboots);
    ``model`` is ``canonical_model(name, memory_total_bytes)`` so it compares directly with a
    job's model constraint. ``mig_enabled`` is ``None`` when the driver could not say.
    """

    index: int
    uuid: str
    name: str
    model: str
    memory_total_bytes: int
    mig_enabled: bool | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU.

    Every numeric field is ``None`` when the value is unknown or not supported, never 0.
    ``energy_mj`` is NVML's cumulative counter since the driver loaded, so consumers take
    differences between samples rather than reading it as a per-interval amount.
    ``health_reasons`` explains, in words for an operator, why ``health`` is not ``ok``.
    """

    uuid: str
    health: GpuHealth
    utilization_pct: int | None
    memory_used_bytes: int | None
    temperature_c: int | None
    power_mw: int | None
    energy_mj: int | None
    process_count: int | None
    health_reasons: tuple[str, ...] = ()


class GpuReader(Protocol):
    """The source of GPU facts for one host.

    ``inventory()`` and ``sample()`` list GPUs in the same order and with the same UUIDs;
    ``close()`` releases the underlying library and may be called more than once.
    """

    def driver_version(self) -> str | None: ...

    def inventory(self) -> list[GpuInfo]: ...

    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


class GpuReaderError(Exception):
    """The GPU source cannot be used at all (NVML missing, driver not loaded, init failed).

    The message is meant for the operator who started the agent and says what to do next.
    """
