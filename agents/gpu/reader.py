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
class MigInstance:
    """One MIG GPU instance of a MIG-enabled GPU (its own UUID, profile and memory)."""

    uuid: str
    profile: str  # e.g. "1g.10gb", from the instance's device name
    memory_total_bytes: int | None


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
    compute_capability: str | None = None  # "9.0"
    pci_bus_id: str | None = None  # "00000000:00:07.0"
    serial: str | None = None
    mig_instances: tuple[MigInstance, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process NVML sees on a GPU; ``used_memory_bytes`` is None when hidden."""

    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU.

    Every numeric field is ``None`` when the value is unknown or not supported, never 0.
    ``energy_mj`` is NVML's cumulative counter since the driver loaded, so consumers take
    differences between samples rather than reading it as a per-interval amount.
    ``health_reasons`` explains, in words for an operator, why ``health`` is not ``ok``; on
    an ``ok`` GPU it may name an event worth seeing that left the GPU healthy (an
    application's XID 13), in the sample after the event only.
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
    # None when NVML could not list them (not an empty tuple: "none running" is a fact).
    processes: tuple[GpuProcess, ...] | None = None
    # Names of the active clock-throttle reasons ("sw_power_cap", "hw_slowdown", ...);
    # None when unknown, () when the clocks are not throttled.
    throttle_reasons: tuple[str, ...] | None = None
    # Costly fields, read only every ``costly_every`` samples; None in between. PCIe
    # throughput is NVML's, in KB/s over the 20 ms the call measures.
    pcie_tx_kbps: int | None = None
    pcie_rx_kbps: int | None = None


class GpuReader(Protocol):
    """The source of GPU facts for one host.

    ``inventory()`` and ``sample()`` list GPUs in the same order and with the same UUIDs;
    ``close()`` releases the underlying library and may be called more than once.
    """

    def driver_version(self) -> str | None: ...

    def cuda_driver_version(self) -> str | None:
        """The newest CUDA version the driver supports ("13.0"); None when unknown."""
        ...

    def inventory(self) -> list[GpuInfo]: ...

    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


class GpuReaderError(Exception):
    """The GPU source cannot be used at all (NVML missing, driver not loaded, init failed,
    or NVML broke while the agent ran: the driver was unloaded, the container lost access).
    ``sample()`` raises it for the last case, which the agent reports as the node's NVML
    being broken, distinctly from a GPU being lost.

    The message is meant for the operator who started the agent and says what to do next.
    """
