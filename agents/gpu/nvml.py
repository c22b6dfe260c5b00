"""Reads GPUs through NVML (the ``pynvml`` module of nvidia-ml-py).

``pynvml`` is imported inside ``NvmlReader.__init__`` only, so that the rest of the agent (and
the scheduler, which imports the agent's value types) loads on hosts without NVIDIA drivers.
Any object shaped like the pynvml module can be passed instead, which is how tests and
``--replay`` run this exact code against ``RecordedNvml``.

Health of a GPU in a sample:
- ``failed``: uncorrected volatile ECC errors, a row-remapping failure, a double-bit ECC
  event, a fatal XID, or the GPU lost (fallen off the bus, ``NVML_ERROR_GPU_IS_LOST`` on a
  query). Fatal events and a lost GPU are sticky: the GPU stays ``failed`` for the life of
  the reader, because only a GPU reset or a reboot (which ends this NVML session) clears them;
- ``degraded``: a row remap is pending (the GPU needs a reset to apply it);
- ``ok``: at least one health query answered cleanly and found nothing;
- ``unknown``: no health query could be answered at all.

XIDs come through an NVML event set registered for critical-XID and double-bit-ECC events
on every GPU, polled with timeout 0 (never waiting) at each sample:
- fatal, the GPU is ``failed`` from then on: 48 (double-bit ECC), 62 (micro-controller
  halt), 64 (row-remapper failure), 74 (NVLink), 79 (fallen off the bus), 92 (high
  single-bit ECC rate), 94 and 95 (contained and uncontained ECC errors), 119 and 120 (GSP
  timeout and error), 140 (unrecovered ECC error);
- application faults, 13 (graphics engine exception), 31 (GPU memory page fault),
  43 (GPU stopped processing), 45 (preemptive cleanup), and 63 (a row-remap recorded,
  informational): named in ``health_reasons`` of the next sample only, health unchanged:
  the faulting process is broken, the GPU is not;
- any other XID: named in the next sample as unlisted, health unchanged, logged as a warning.

MIG: a MIG-enabled GPU is reported in the inventory with its instances (UUID, profile from
the instance's name such as ``1g.10gb``, memory), but the control plane does not place gangs
on it: gangs take whole GPUs. It is sampled as the whole GPU (NVML reports no utilisation
for it: ``None``).

A GPU lost is not NVML broken. A lost GPU is that GPU's problem (``failed``, "GPU is lost
..."; the others are still read). NVML itself failing while running (``UNINITIALIZED``,
``DRIVER_NOT_LOADED`` or ``LIB_RM_VERSION_MISMATCH`` on any call, ``NO_PERMISSION`` on every
query of every GPU, or ``nvmlDeviceGetCount`` failing) is the node's: ``sample()`` raises
``GpuReaderError`` with a message starting "NVML broke while the agent was running".

Cadence: the cheap and the essential queries run at every sample, the costly ones only every
``costly_every``-th (the first sample included), ``None`` in between; the uncorrected ECC
count joins the costly ones on a GPU whose double-bit ECC events are watched (the event
reports a new error at once), and its last value stands in between. The figures behind the
split are beside ``EVERY_SAMPLE_QUERIES``.

Invariants:
- a field whose query fails is ``None``; NotSupported is "unknown", never 0, so a VM that
  hides power readings does not report a GPU drawing 0 W;
- ``inventory()`` and ``sample()`` list the same GPUs, in NVML index order.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from agents.gpu.reader import GpuInfo, GpuProcess, GpuReaderError, GpuSample, MigInstance
from scheduler.domain.enums import GpuHealth
from scheduler.domain.gpu_models import canonical_model

if TYPE_CHECKING:
    from agents.gpu.recorded import RecordedNvml

logger = logging.getLogger(__name__)

COSTLY_EVERY = 30
"""Default ``costly_every``: at one sample per 10 s heartbeat, PCIe throughput every 5 min."""

# NVML return codes (nvml.h).
_UNINITIALIZED = 1
_NO_PERMISSION = 4
_NOT_FOUND = 6
_NOT_SUPPORTED = 3
_DRIVER_NOT_LOADED = 9
_TIMEOUT = 10
_LIBRARY_NOT_FOUND = 12
_GPU_IS_LOST = 15
_LIB_RM_VERSION_MISMATCH = 18
_NVML_BROKEN = frozenset({_UNINITIALIZED, _DRIVER_NOT_LOADED, _LIB_RM_VERSION_MISMATCH})

_TEMPERATURE_GPU = 0
_MEMORY_ERROR_TYPE_UNCORRECTED = 1
_VOLATILE_ECC = 0
_MIG_ENABLE = 1
_PCIE_TX_BYTES = 0
_PCIE_RX_BYTES = 1
_EVENT_DOUBLE_BIT_ECC = 0x2
_EVENT_XID_CRITICAL = 0x8
_NOT_AVAILABLE_U64 = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE: process memory hidden
_MAX_EVENTS_PER_SAMPLE = 64

# Which query runs when, decided from ``latency_us`` in the real recordings (H100 / H200,
# microseconds per call, tests/fixtures/nvml/*/nvml_snapshot.json):
# - every sample: utilisation 3,781 / 4,009, energy 3,537 / 3,527, power 1,835 / 1,901,
#   temperature 521 / 534, throttle reasons 435 / 404, compute processes 53 / 55, memory
#   41 / 43, remapped rows 30 / 38: 10.2 / 10.5 ms per GPU. The slow ones are the metrics a
#   heartbeat exists to carry; remapped rows are health and cheap. Plus nvmlDeviceGetCount
#   (13 us) and one event-set poll per sample for the whole host;
# - the uncorrected ECC count, 1,455 / 1,888: every sample on a GPU whose double-bit ECC
#   events cannot be watched; where they can, a new uncorrectable error arrives as an event
#   at the next sample, so the count (which only grows while the driver is loaded) is read
#   with the costly fields and its last value stands in between;
# - every ``costly_every``-th sample: PCIe TX and RX throughput, 21,102 / 21,105 each: NVML
#   counts bytes over a 20 ms window inside the call, so the two directions cost four times
#   all the other queries of a GPU together;
# - once, in ``inventory()``: name, UUID, serial, PCI bus id, compute capability, MIG mode
#   (356 / 478) and instances, driver and CUDA versions: fixed while NVML is loaded.
EVERY_SAMPLE_QUERIES = (
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetTemperature(0)",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetRemappedRows",
)
EVENT_BACKED_QUERIES = ("nvmlDeviceGetTotalEccErrors(1,0)",)
COSTLY_QUERIES = ("nvmlDeviceGetPcieThroughput(0)", "nvmlDeviceGetPcieThroughput(1)")
INVENTORY_QUERIES = (
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetSerial",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetCudaComputeCapability",
    "nvmlDeviceGetMigMode",
)

# Clock-throttle ("clocks event") reason bits, with names that stay stable across pynvml's
# renames (ClocksThrottleReason -> ClocksEventReason).
_THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
    (0x200, "board_limit"),
    (0x400, "reliability"),
)

_FATAL_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    64: "ECC page retirement or row-remapper recording failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}
_APPLICATION_XIDS: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup, due to previous errors",
    63: "ECC page retirement or row remapping recorded",
}

_LOST = "GPU is lost (fell off the bus): it needs a reset or a reboot"
_MIG_PROFILE = re.compile(r"\b(\d+g\.\d+gb)\b", re.IGNORECASE)


def throttle_reason_names(mask: int) -> tuple[str, ...]:
    """NVML's clock-throttle bitmask as names: ``0x5`` -> ``("gpu_idle", "sw_power_cap")``.

    Bits this table does not know come out as ``unknown_0x800`` rather than being dropped.
    """
    names = [name for bit, name in _THROTTLE_REASONS if mask & bit]
    known = 0
    for bit, _name in _THROTTLE_REASONS:
        known |= bit
    rest = mask & ~known
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"unknown_{bit:#x}")
            rest &= ~bit
        bit <<= 1
    return tuple(names)


def xid_reason(xid: int) -> tuple[bool, str]:
    """``(fatal, reason)`` for an XID, the reason worded for an operator."""
    if xid in _FATAL_XIDS:
        return True, f"XID {xid} ({_FATAL_XIDS[xid]}): the GPU needs a reset or a reboot"
    if xid in _APPLICATION_XIDS:
        return False, f"XID {xid} ({_APPLICATION_XIDS[xid]}): an application fault, GPU ok"
    return False, f"XID {xid} (not in the reader's list of known XIDs): see dmesg"


def cuda_version_text(version: int) -> str:
    """NVML's CUDA driver version as text: ``13000`` -> ``"13.0"``, ``12040`` -> ``"12.4"``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _text(value: Any) -> str:
    """pynvml < 11.5 returns ``bytes`` for names and UUIDs, later versions ``str``."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace").rstrip("\x00")
    return str(value)


def _error_code(error: BaseException) -> int | None:
    value = getattr(error, "value", None)
    return value if isinstance(value, int) else None


def _handle_key(handle: Any) -> Hashable:
    """pynvml's handles are ctypes pointers, and two pointers to one device compare unequal
    (an event's ``device`` is a new pointer object): key them by address."""
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


def _broken_message(what: str, exc: BaseException) -> str:
    code = _error_code(exc)
    if code == _LIB_RM_VERSION_MISMATCH:
        cause = (
            "the NVIDIA driver was upgraded under the running agent (libnvidia-ml.so and the "
            "kernel module differ): reload the driver or reboot"
        )
    elif code == _NO_PERMISSION:
        cause = (
            "this process lost access to the GPUs (permissions on /dev/nvidia*, or the "
            "container's device list changed)"
        )
    else:
        cause = "the NVIDIA driver was unloaded or NVML stopped answering"
    return (
        f"NVML broke while the agent was running: {what} failed ({exc}); {cause}. The node's "
        "GPUs are unknown, not lost: restart the agent once NVML works again"
    )


@dataclass(frozen=True, slots=True)
class _Device:
    index: int
    handle: Any
    uuid: str


@dataclass(slots=True)
class _Outcome:
    """How one GPU's queries went in one sample."""

    answered: int = 0
    failures: int = 0
    refused: int = 0
    lost: bool = False
    errors: dict[str, BaseException] = field(default_factory=dict)  # by query name

    def failed(self, query: str, exc: BaseException) -> None:
        self.errors[query] = exc
        self.failures += 1
        code = _error_code(exc)
        if code == _NO_PERMISSION:
            self.refused += 1
        elif code == _GPU_IS_LOST:
            self.lost = True

    @property
    def refused_everything(self) -> bool:
        return self.refused > 0 and self.answered == 0 and self.refused == self.failures


class NvmlReader:
    """``GpuReader`` over NVML; one instance holds one ``nvmlInit`` until ``close()``.

    ``nvml`` is the pynvml module, or an object with the same functions and ``NVMLError``
    (``RecordedNvml``); ``None`` imports pynvml here. Raises ``GpuReaderError`` when NVML
    cannot be imported or initialised, with a message saying what to do instead.

    ``costly_every``: the costly fields (PCIe throughput, 21 ms per call and direction on the
    recorded H100/H200) are read at the first sample and every ``costly_every``-th after it,
    and are ``None`` in the samples between; so is the uncorrected ECC count (1.5 ms) where
    double-bit ECC events stand in for it. 1 reads everything every time.
    """

    def __init__(
        self, nvml: ModuleType | RecordedNvml | None = None, *, costly_every: int = COSTLY_EVERY
    ) -> None:
        if costly_every < 1:
            raise ValueError(f"costly_every must be at least 1, got {costly_every}")
        if nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                raise GpuReaderError(
                    "the pynvml module (package nvidia-ml-py) is not installed: "
                    "install it, or use --simulate on hosts without GPUs"
                ) from exc
            nvml = pynvml
        self._nvml: Any = nvml
        self._error: type[BaseException] = nvml.NVMLError
        try:
            self._nvml.nvmlInit()
        except self._error as exc:
            raise GpuReaderError(_init_failure_message(exc)) from exc
        except OSError as exc:  # a broken libnvidia-ml.so can surface as a loader error
            raise GpuReaderError(
                f"NVML could not be loaded on this host ({exc}): use --simulate"
            ) from exc
        self._open = True
        self._costly_every = costly_every
        self._samples_taken = 0
        self._devices: list[_Device] | None = None
        self._device_count: int | None = None
        self._events: Any = None  # the NVML event set; None when no GPU's events are watched
        self._sticky: dict[str, list[str]] = {}  # uuid -> reasons it stays failed for
        self._xid_watched: set[str] = set()  # GPUs whose XID events are watched
        self._ecc_watched: set[str] = set()  # ... and those whose double-bit ECC events are
        self._ecc_counts: dict[str, int] = {}  # uuid -> last uncorrected ECC count read
        self._lost: set[str] = set()
        self._warned: set[tuple[str, str, int | None]] = set()
        # pynvml 12+ also names it nvmlDeviceGetCurrentClocksEventReasons and may drop the
        # old name one day; the recordings were made through the old one.
        self._throttle_query = (
            "nvmlDeviceGetCurrentClocksThrottleReasons"
            if hasattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons")
            else "nvmlDeviceGetCurrentClocksEventReasons"
        )

    # -- GpuReader -------------------------------------------------------------------------

    def driver_version(self) -> str | None:
        try:
            return _text(self._nvml.nvmlSystemGetDriverVersion())
        except self._error as exc:
            self._warn_once("system", "nvmlSystemGetDriverVersion", exc)
            return None

    def cuda_driver_version(self) -> str | None:
        """The newest CUDA version the driver supports (``"13.0"``), not a toolkit's."""
        try:
            return cuda_version_text(int(self._nvml.nvmlSystemGetCudaDriverVersion()))
        except self._error as exc:
            self._warn_once("system", "nvmlSystemGetCudaDriverVersion", exc)
            return None

    def inventory(self) -> list[GpuInfo]:
        """Static facts of every GPU whose identity and memory size NVML can report.

        A GPU whose name or memory cannot be read is left out (with a warning) rather than
        reported with made-up values; the scheduler then sees it as missing.
        """
        infos: list[GpuInfo] = []
        for device in self._discover():
            outcome = _Outcome()
            name = self._call(device, "nvmlDeviceGetName", outcome=outcome)
            memory = self._call(device, "nvmlDeviceGetMemoryInfo", outcome=outcome)
            if name is None or memory is None:
                logger.warning(
                    "GPU %d (%s) left out of the inventory: NVML could not read it: %s",
                    device.index,
                    device.uuid,
                    "; ".join(f"{q}: {e}" for q, e in outcome.errors.items()),
                )
                continue
            name = _text(name)
            memory_total = int(memory.total)
            mig_enabled = self._mig_enabled(device)
            infos.append(
                GpuInfo(
                    index=device.index,
                    uuid=device.uuid,
                    name=name,
                    model=canonical_model(name, memory_total),
                    memory_total_bytes=memory_total,
                    mig_enabled=mig_enabled,
                    compute_capability=self._compute_capability(device),
                    pci_bus_id=self._pci_bus_id(device),
                    serial=self._serial(device),
                    mig_instances=self._mig_instances(device) if mig_enabled else (),
                )
            )
        return infos

    def sample(self) -> list[GpuSample]:
        """One reading of every GPU; raises ``GpuReaderError`` when NVML itself broke."""
        devices = self._discover()
        self._check_nvml()
        costly = self._samples_taken % self._costly_every == 0
        self._samples_taken += 1
        notes = self._read_events(devices)
        readings = [
            self._sample_one(d, costly=costly, notes=notes.get(d.uuid, ())) for d in devices
        ]
        if readings and all(outcome.refused_everything for _, outcome in readings):
            first = next(iter(readings[0][1].errors.values()))
            raise GpuReaderError(_broken_message("every query on every GPU", first))
        return [sample for sample, _ in readings]

    def watched_events(self) -> dict[str, tuple[str, ...]]:
        """Per GPU UUID, the NVML events this reader is notified of: ``("xid",
        "double_bit_ecc")`` on a GPU that supports both, ``()`` where none could be
        registered (its health then comes from the queries alone)."""
        return {
            d.uuid: tuple(
                kind
                for kind, watched in (
                    ("xid", self._xid_watched),
                    ("double_bit_ecc", self._ecc_watched),
                )
                if d.uuid in watched
            )
            for d in self._discover()
        }

    def close(self) -> None:
        """Release the event set and NVML; safe to call twice."""
        if not self._open:
            return
        self._open = False
        if self._events is not None:
            try:
                self._nvml.nvmlEventSetFree(self._events)
            except self._error as exc:
                logger.warning("nvmlEventSetFree failed: %s", exc)
            self._events = None
        try:
            self._nvml.nvmlShutdown()
        except self._error as exc:
            logger.warning("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> NvmlReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- discovery and NVML's own health ----------------------------------------------------

    def _discover(self) -> list[_Device]:
        """Handles and UUIDs, read once: both are stable for the life of an NVML session.
        The event set is registered here too, so no event raised after discovery is missed."""
        if self._devices is not None:
            return self._devices
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except self._error as exc:
            raise GpuReaderError(f"NVML could not count the GPUs on this host: {exc}") from exc
        devices: list[_Device] = []
        for index in range(count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(self._nvml.nvmlDeviceGetUUID(handle))
            except self._error as exc:
                logger.warning("GPU %d skipped: NVML could not identify it: %s", index, exc)
                continue
            devices.append(_Device(index=index, handle=handle, uuid=uuid))
        self._devices = devices
        self._device_count = count
        self._events = self._watch_events(devices)
        return devices

    def _check_nvml(self) -> None:
        """``nvmlDeviceGetCount`` (13 us) at every sample: the cheapest call that fails when
        NVML itself has broken (driver unloaded, access lost)."""
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except self._error as exc:
            raise GpuReaderError(_broken_message("nvmlDeviceGetCount", exc)) from exc
        if count != self._device_count and ("system", "count", count) not in self._warned:
            self._warned.add(("system", "count", count))
            logger.warning(
                "NVML now counts %d GPU(s), %d when the agent started: restart the agent to "
                "report the change",
                count,
                self._device_count,
            )

    def _watch_events(self, devices: list[_Device]) -> Any:
        """An event set with every GPU registered for critical XIDs and double-bit ECC
        errors; a GPU that supports only XID events is registered for those alone."""
        if not devices:
            return None
        try:
            events = self._nvml.nvmlEventSetCreate()
        except self._error as exc:
            self._warn_once("system", "nvmlEventSetCreate", exc)
            return None
        watched = 0
        for device in devices:
            for mask in (_EVENT_XID_CRITICAL | _EVENT_DOUBLE_BIT_ECC, _EVENT_XID_CRITICAL):
                try:
                    self._nvml.nvmlDeviceRegisterEvents(device.handle, mask, events)
                except self._error as exc:
                    if _error_code(exc) == _NOT_SUPPORTED and mask != _EVENT_XID_CRITICAL:
                        continue
                    logger.warning(
                        "XID events of GPU %d (%s) are not watched: %s",
                        device.index,
                        device.uuid,
                        exc,
                    )
                    break
                watched += 1
                self._xid_watched.add(device.uuid)
                if mask & _EVENT_DOUBLE_BIT_ECC:
                    self._ecc_watched.add(device.uuid)
                break
        if watched == 0:
            self._xid_watched.clear()
            self._ecc_watched.clear()
            try:
                self._nvml.nvmlEventSetFree(events)
            except self._error as exc:
                logger.debug("nvmlEventSetFree failed: %s", exc)
            return None
        return events

    def _read_events(self, devices: list[_Device]) -> dict[str, list[str]]:
        """Drain the event set without waiting. Fatal events become sticky reasons of their
        GPU; the rest are returned as notes for this sample only, by UUID."""
        notes: dict[str, list[str]] = {}
        if self._events is None:
            return notes
        by_handle = {_handle_key(d.handle): d for d in devices}
        for _ in range(_MAX_EVENTS_PER_SAMPLE):
            try:
                event = self._nvml.nvmlEventSetWait_v2(self._events, 0)
            except self._error as exc:
                code = _error_code(exc)
                if code == _TIMEOUT:  # no event waiting
                    break
                if code in _NVML_BROKEN:
                    raise GpuReaderError(_broken_message("nvmlEventSetWait_v2", exc)) from exc
                self._warn_once("system", "nvmlEventSetWait_v2", exc)
                break
            device = by_handle.get(_handle_key(event.device))
            if device is None:
                logger.warning("NVML event 0x%x for an unknown GPU ignored", int(event.eventType))
                continue
            event_type, data = int(event.eventType), int(event.eventData)
            if event_type & _EVENT_XID_CRITICAL:
                fatal, reason = xid_reason(data)
                logger.log(
                    logging.ERROR if fatal else logging.WARNING,
                    "GPU %d (%s): %s",
                    device.index,
                    device.uuid,
                    reason,
                )
                if fatal:
                    self._stick(device, reason)
                else:
                    notes.setdefault(device.uuid, []).append(reason)
            elif event_type & _EVENT_DOUBLE_BIT_ECC:
                reason = "double-bit (uncorrectable) ECC error event: the GPU needs a reset"
                logger.error("GPU %d (%s): %s", device.index, device.uuid, reason)
                self._stick(device, reason)
        return notes

    def _stick(self, device: _Device, reason: str) -> None:
        reasons = self._sticky.setdefault(device.uuid, [])
        if reason not in reasons:
            reasons.append(reason)

    # -- inventory --------------------------------------------------------------------------

    def _mig_enabled(self, device: _Device) -> bool | None:
        """NotSupported means the GPU cannot do MIG, so MIG is certainly off (False)."""
        outcome = _Outcome()
        mode = self._call(device, "nvmlDeviceGetMigMode", outcome=outcome)
        if mode is None:
            exc = outcome.errors.get("nvmlDeviceGetMigMode")
            return False if exc is not None and _error_code(exc) == _NOT_SUPPORTED else None
        return int(mode[0]) == _MIG_ENABLE

    def _compute_capability(self, device: _Device) -> str | None:
        capability = self._call(device, "nvmlDeviceGetCudaComputeCapability")
        return None if capability is None else f"{int(capability[0])}.{int(capability[1])}"

    def _pci_bus_id(self, device: _Device) -> str | None:
        info = self._call(device, "nvmlDeviceGetPciInfo")
        return None if info is None else _text(info.busId)

    def _serial(self, device: _Device) -> str | None:
        serial = self._call(device, "nvmlDeviceGetSerial")
        return None if serial is None else _text(serial)

    def _mig_instances(self, device: _Device) -> tuple[MigInstance, ...]:
        slots = self._call(device, "nvmlDeviceGetMaxMigDeviceCount")
        instances: list[MigInstance] = []
        for slot in range(int(slots or 0)):
            try:
                handle = self._nvml.nvmlDeviceGetMigDeviceHandleByIndex(device.handle, slot)
            except self._error as exc:
                if _error_code(exc) == _NOT_FOUND:  # an empty slot
                    continue
                if _error_code(exc) in _NVML_BROKEN:
                    raise GpuReaderError(_broken_message("a MIG instance query", exc)) from exc
                self._warn_once(device.uuid, "nvmlDeviceGetMigDeviceHandleByIndex", exc)
                continue
            mig = _Device(index=device.index, handle=handle, uuid=f"{device.uuid} MIG {slot}")
            uuid = self._call(mig, "nvmlDeviceGetUUID")
            if uuid is None:
                continue
            name = self._call(mig, "nvmlDeviceGetName")
            memory = self._call(mig, "nvmlDeviceGetMemoryInfo")
            instances.append(
                MigInstance(
                    uuid=_text(uuid),
                    profile=_mig_profile(None if name is None else _text(name)),
                    memory_total_bytes=None if memory is None else int(memory.total),
                )
            )
        return tuple(instances)

    # -- samples ----------------------------------------------------------------------------

    def _call(self, device: _Device, name: str, *args: int, outcome: _Outcome | None = None) -> Any:
        """One NVML query on one GPU: its answer, or ``None`` when it failed for this GPU.

        Raises ``GpuReaderError`` when the failure is NVML's own, not the GPU's.
        """
        try:
            value = getattr(self._nvml, name)(device.handle, *args)
        except self._error as exc:
            if _error_code(exc) in _NVML_BROKEN:
                raise GpuReaderError(_broken_message(f"{name} on GPU {device.index}", exc)) from exc
            self._warn_once(device.uuid, name, exc)
            if outcome is not None:
                outcome.failed(name, exc)
            return None
        if outcome is not None:
            outcome.answered += 1
        return value

    def _warn_once(self, uuid: str, query: str, exc: BaseException) -> None:
        """NotSupported is normal (VMs, older GPUs): log it at debug; other failures warn once."""
        code = _error_code(exc)
        key = (uuid, query, code)
        if key in self._warned:
            return
        self._warned.add(key)
        level = logging.DEBUG if code == _NOT_SUPPORTED else logging.WARNING
        logger.log(level, "NVML %s failed on %s: %s", query, uuid, exc)

    def _sample_one(
        self, device: _Device, *, costly: bool, notes: list[str] | tuple[str, ...]
    ) -> tuple[GpuSample, _Outcome]:
        outcome = _Outcome()
        if device.uuid in self._lost:
            # A lost GPU answers nothing until it is reset, which ends this NVML session.
            return self._unanswered(device, notes), outcome

        def call(name: str, *args: int) -> Any:
            if outcome.lost:  # the rest would fail the same way, each taking its time
                return None
            return self._call(device, name, *args, outcome=outcome)

        util = call("nvmlDeviceGetUtilizationRates")
        memory = call("nvmlDeviceGetMemoryInfo")
        temperature = call("nvmlDeviceGetTemperature", _TEMPERATURE_GPU)
        power = call("nvmlDeviceGetPowerUsage")
        energy = call("nvmlDeviceGetTotalEnergyConsumption")
        processes = call("nvmlDeviceGetComputeRunningProcesses")
        throttle = call(self._throttle_query)
        rows = call("nvmlDeviceGetRemappedRows")
        if costly or device.uuid not in self._ecc_watched:
            ecc = call("nvmlDeviceGetTotalEccErrors", _MEMORY_ERROR_TYPE_UNCORRECTED, _VOLATILE_ECC)
            if ecc is not None:
                self._ecc_counts[device.uuid] = int(ecc)
        else:  # new errors come as events; the count can only have grown with one
            ecc = self._ecc_counts.get(device.uuid)
        tx = rx = None
        if costly:
            tx = call("nvmlDeviceGetPcieThroughput", _PCIE_TX_BYTES)
            rx = call("nvmlDeviceGetPcieThroughput", _PCIE_RX_BYTES)
        if outcome.lost:
            logger.error("GPU %d (%s): %s", device.index, device.uuid, _LOST)
            self._lost.add(device.uuid)
            self._stick(device, _LOST)
        health, reasons = self._health(device, ecc, rows, outcome, notes)
        listed = None if processes is None else tuple(_process(p) for p in processes)
        sample = GpuSample(
            uuid=device.uuid,
            health=health,
            utilization_pct=None if util is None else int(util.gpu),
            memory_used_bytes=None if memory is None else int(memory.used),
            temperature_c=None if temperature is None else int(temperature),
            power_mw=None if power is None else int(power),
            energy_mj=None if energy is None else int(energy),
            process_count=None if listed is None else len(listed),
            health_reasons=reasons,
            processes=listed,
            throttle_reasons=None if throttle is None else throttle_reason_names(int(throttle)),
            pcie_tx_kbps=None if tx is None else int(tx),
            pcie_rx_kbps=None if rx is None else int(rx),
        )
        return sample, outcome

    def _unanswered(self, device: _Device, notes: list[str] | tuple[str, ...]) -> GpuSample:
        return GpuSample(
            uuid=device.uuid,
            health=GpuHealth.failed,
            utilization_pct=None,
            memory_used_bytes=None,
            temperature_c=None,
            power_mw=None,
            energy_mj=None,
            process_count=None,
            health_reasons=(*self._sticky.get(device.uuid, [_LOST]), *notes),
        )

    def _health(
        self,
        device: _Device,
        ecc: Any,
        rows: Any,
        outcome: _Outcome,
        notes: list[str] | tuple[str, ...],
    ) -> tuple[GpuHealth, tuple[str, ...]]:
        failed = list(self._sticky.get(device.uuid, ()))
        degraded: list[str] = []
        unanswered: list[str] = []
        if ecc is None:
            why = outcome.errors.get("nvmlDeviceGetTotalEccErrors", "not read yet")
            unanswered.append(f"uncorrected ECC error count unavailable ({why})")
        elif int(ecc) > 0:
            failed.append(f"{int(ecc)} uncorrected ECC error(s) since the driver loaded")
        if rows is None:
            why = outcome.errors.get("nvmlDeviceGetRemappedRows", "not read")
            unanswered.append(f"row remapping state unavailable ({why})")
        else:
            _corrected, _uncorrected, pending, failure = rows
            if failure:
                failed.append("row remapping failed: the GPU memory has unrepairable rows")
            if pending:
                degraded.append("row remapping pending: the GPU needs a reset to apply it")
        if failed:
            return GpuHealth.failed, (*failed, *degraded, *notes)
        if degraded:
            return GpuHealth.degraded, (*degraded, *notes)
        if ecc is None and rows is None:
            return GpuHealth.unknown, (*unanswered, *notes)
        return GpuHealth.ok, tuple(notes)


def _process(entry: Any) -> GpuProcess:
    used = getattr(entry, "usedGpuMemory", None)
    if used is None or int(used) >= _NOT_AVAILABLE_U64:
        return GpuProcess(pid=int(entry.pid), used_memory_bytes=None)
    return GpuProcess(pid=int(entry.pid), used_memory_bytes=int(used))


def _mig_profile(name: str | None) -> str:
    """``"NVIDIA H100 80GB HBM3 MIG 1g.10gb"`` -> ``"1g.10gb"``."""
    if not name:
        return "unknown"
    match = _MIG_PROFILE.search(name)
    if match:
        return match.group(1).lower()
    return name.rsplit(" MIG ", 1)[-1]


def _init_failure_message(exc: BaseException) -> str:
    """Operator-facing advice for the ways ``nvmlInit`` fails."""
    code = _error_code(exc)
    if code == _LIBRARY_NOT_FOUND:
        return "NVML is not available on this host (libnvidia-ml.so not found): use --simulate"
    if code == _DRIVER_NOT_LOADED:
        return (
            "the NVIDIA driver is not loaded on this host (NVML: Driver Not Loaded): "
            "load the driver, or use --simulate"
        )
    if code == _NO_PERMISSION:
        return f"NVML refused access ({exc}): run the agent as a user allowed to open /dev/nvidia*"
    if code == _LIB_RM_VERSION_MISMATCH:
        return (
            f"NVML and the NVIDIA kernel module have different versions ({exc}): the driver "
            "was upgraded without reloading it; reload the driver or reboot"
        )
    return f"NVML failed to initialise ({exc}): check the NVIDIA driver, or use --simulate"
