"""A stand-in for the ``pynvml`` module that answers from real recordings.

Why: the agent's NVML code must be tested on hosts without GPUs, and a hand-written fake
would encode our assumptions rather than what NVML really returns (which calls fail with
NotSupported on a VM, how the energy counter moves, that utilisation lags a starting load).
``RecordedNvml`` answers from ``nvml_snapshot.json``, ``nvml_timeseries.json`` and
``nvidia-smi-q.xml`` recorded on real H100/H200 machines (see
``tests/fixtures/nvml/README.md``), and is also what ``--replay DIR`` runs the agent against.

Behaviour, in the shape of pynvml:

- static queries return the snapshot's value; a recorded failure is raised as the matching
  ``NVMLError`` subclass (``NVMLError_NotSupported`` with ``.value == 3`` and so on);
- time-varying queries of device 0 (utilisation, memory info, power, energy, temperature,
  compute processes, throttle reasons, SM clock) step through the time series: each query
  keeps its own cursor that advances on every call and stays on the last sample once the
  recording is exhausted, so a reader that asks each query once per round sees the recorded
  rows in lockstep;
- PCIe RX throughput (``nvmlDeviceGetPcieThroughput(1)``) was not called by the probe; it is
  answered with ``rx_util`` from ``nvidia-smi-q.xml`` of the same machine (NotSupported when
  that file is absent);
- ``gpus=N`` replays a host of N GPUs: N copies of device 0 with their own UUID, serial, PCI
  bus id and minor number, everything else as recorded (only device 0 follows the time
  series; the copies answer the snapshot, an idle GPU as the probe found it);
- ``simulate_latency=True`` makes every call take the time the probe measured for it
  (``latency_us`` in the snapshot) by sleeping: wall time, not CPU time. Calls the probe did
  not time (event sets, MIG handles, handle lookups) take no time;
- ``overrides`` replace one query's answer on every device (a value, or an error to raise);
  the fault methods below (``inject_xid``, ``lose_gpu``, ...) build the states the
  recordings lack, per device, changing only what the fault changes; both win over the files;
- every query before ``nvmlInit`` (or after the matching ``nvmlShutdown``) raises
  ``NVMLError_Uninitialized``, as the real library does;
- a query with no recording raises ``LookupError`` rather than an ``NVMLError``, so a reader
  calling it with the wrong arguments fails a test instead of quietly reading "unknown".
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from scheduler.domain.gpu_models import marketing_gb

logger = logging.getLogger(__name__)

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_PCIE_UTIL_TX_BYTES = 0
NVML_PCIE_UTIL_RX_BYTES = 1

nvmlEventTypeDoubleBitEccError = 0x0000000000000002
nvmlEventTypeXidCriticalError = 0x0000000000000008

_ERROR_STRINGS: dict[int, str] = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Mirror of ``pynvml.NVMLError``: ``NVMLError(code)`` builds the subclass for ``code``.

    Subclasses are constructed without arguments (``NVMLError_NotSupported()``), as in pynvml,
    and always carry the NVML return code in ``.value``.
    """

    _by_code: dict[int, type[NVMLError]] = {}
    code: int = NVML_ERROR_UNKNOWN
    value: int

    def __new__(cls, value: int | None = None) -> NVMLError:
        code = cls.code if value is None else value
        target = NVMLError._by_code.get(code, cls) if cls is NVMLError else cls
        obj = Exception.__new__(target)
        obj.value = code
        return obj

    def __init__(self, value: int | None = None) -> None:
        super().__init__(self.value)

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        NVMLError._by_code[cls.code] = cls


class NVMLError_Uninitialized(NVMLError):
    code = NVML_ERROR_UNINITIALIZED


class NVMLError_InvalidArgument(NVMLError):
    code = NVML_ERROR_INVALID_ARGUMENT


class NVMLError_NotSupported(NVMLError):
    code = NVML_ERROR_NOT_SUPPORTED


class NVMLError_NoPermission(NVMLError):
    code = NVML_ERROR_NO_PERMISSION


class NVMLError_NotFound(NVMLError):
    code = NVML_ERROR_NOT_FOUND


class NVMLError_DriverNotLoaded(NVMLError):
    code = NVML_ERROR_DRIVER_NOT_LOADED


class NVMLError_Timeout(NVMLError):
    code = NVML_ERROR_TIMEOUT


class NVMLError_LibraryNotFound(NVMLError):
    code = NVML_ERROR_LIBRARY_NOT_FOUND


class NVMLError_FunctionNotFound(NVMLError):
    code = NVML_ERROR_FUNCTION_NOT_FOUND


class NVMLError_GpuIsLost(NVMLError):
    code = NVML_ERROR_GPU_IS_LOST


class NVMLError_LibRmVersionMismatch(NVMLError):
    code = NVML_ERROR_LIB_RM_VERSION_MISMATCH


class NVMLError_Unknown(NVMLError):
    code = NVML_ERROR_UNKNOWN


_ERRORS_BY_NAME: dict[str, type[NVMLError]] = {
    cls.__name__: cls
    for cls in (
        NVMLError_Uninitialized,
        NVMLError_InvalidArgument,
        NVMLError_NotSupported,
        NVMLError_NoPermission,
        NVMLError_NotFound,
        NVMLError_DriverNotLoaded,
        NVMLError_Timeout,
        NVMLError_LibraryNotFound,
        NVMLError_FunctionNotFound,
        NVMLError_GpuIsLost,
        NVMLError_LibRmVersionMismatch,
        NVMLError_Unknown,
    )
}

NOT_SUPPORTED: dict[str, Any] = {
    "nvml_error": "NVMLError_NotSupported",
    "code": NVML_ERROR_NOT_SUPPORTED,
    "str": "Not Supported",
}
"""An override value meaning "this query fails with NotSupported", in the snapshot's format."""

# Query key -> the time-series field that replaces the snapshot value for device 0.
_TIME_VARYING: dict[str, str] = {
    "nvmlDeviceGetUtilizationRates": "util",
    "nvmlDeviceGetMemoryInfo": "mem",
    "nvmlDeviceGetPowerUsage": "power_mw",
    "nvmlDeviceGetTotalEnergyConsumption": "energy_mj",
    "nvmlDeviceGetTemperature(0)": "temp_c",
    "nvmlDeviceGetComputeRunningProcesses": "procs",
    "nvmlDeviceGetCurrentClocksThrottleReasons": "throttle",
    "nvmlDeviceGetClockInfo(1)": "sm_clock_mhz",
}

_KEY = re.compile(r"^(\w+)(?:\(([\d,]*)\))?$")
_ECC_UNCORRECTED_VOLATILE = "nvmlDeviceGetTotalEccErrors(1,0)"
_PCIE_RX = "nvmlDeviceGetPcieThroughput(1)"
_MAX_GPUS = 16
_MAX_MIG_INSTANCES = 7  # seven 1g slices on an H100/H200
_NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId of an event outside MIG

# Namespace for the UUIDs of copied GPUs and MIG instances, so they never collide with a
# real UUID or another uuid5 use.
_UUID_NAMESPACE = uuid.UUID("0b6a3f9e-51c2-5d84-a7e3-2f9c41d8b6e0")


@dataclass(frozen=True, slots=True)
class RecordedHandle:
    """Device handle handed out by ``RecordedNvml`` (pynvml hands out an opaque pointer)."""

    index: int


@dataclass(frozen=True, slots=True)
class RecordedMigHandle:
    """Handle of MIG instance ``slot`` of GPU ``parent`` (after ``enable_mig``)."""

    parent: int
    slot: int


@dataclass(eq=False, slots=True)
class RecordedEventSet:
    """What ``nvmlEventSetCreate`` hands out: event masks per device, and unread events."""

    masks: dict[int, int] = field(default_factory=dict)
    pending: deque[SimpleNamespace] = field(default_factory=deque)


@dataclass(slots=True)
class _Gpu:
    """One replayed GPU: its recording and what has been injected into it."""

    queries: dict[str, Any]
    event_registration: Any = "ok"
    faults: dict[str, Any] = field(default_factory=dict)
    lost: bool = False
    mig_instances: int = 0
    energy_offset: int = 0
    last_energy: int | None = None


def _query_key(name: str, *args: int) -> str:
    """The snapshot's key for a call: ``nvmlDeviceGetTotalEccErrors(1,0)``."""
    return f"{name}({','.join(str(a) for a in args)})" if args else name


def parse_query_key(key: str) -> tuple[str, tuple[int, ...]]:
    """A snapshot key as the call it names: ``"nvmlDeviceGetTemperature(0)"`` ->
    ``("nvmlDeviceGetTemperature", (0,))``; the device handle comes first at the call."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"not an NVML query key: {key!r}")
    args = tuple(int(a) for a in (match.group(2) or "").split(",") if a)
    return match.group(1), args


def _error_from_record(record: Mapping[str, Any]) -> NVMLError:
    """Rebuild the recorded exception, by class name first and return code second."""
    cls = _ERRORS_BY_NAME.get(str(record.get("nvml_error")))
    if cls is not None:
        return cls()
    return NVMLError(int(record.get("code", NVML_ERROR_UNKNOWN)))


def _process(entry: Any) -> SimpleNamespace:
    """A recorded compute process (a dict, or the probe's ``str(dict)``) as pynvml's struct."""
    data = ast.literal_eval(entry) if isinstance(entry, str) else dict(entry)
    return SimpleNamespace(
        pid=data.get("pid"),
        usedGpuMemory=data.get("usedGpuMemory"),
        gpuInstanceId=data.get("gpuInstanceId"),
        computeInstanceId=data.get("computeInstanceId"),
    )


def _derived_uuid(prefix: str, base: str, n: int) -> str:
    """A stable NVML-style UUID for copy/instance ``n`` of the GPU ``base``."""
    return f"{prefix}-{uuid.uuid5(_UUID_NAMESPACE, f'{base}/{prefix}/{n}')}"


def _copy_of(queries: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Device 0's recording as GPU ``index`` of the same host: a new identity, same values."""
    copy = dict(queries)
    if index == 0:
        return copy
    copy["nvmlDeviceGetUUID"] = _derived_uuid("GPU", str(queries["nvmlDeviceGetUUID"]), index)
    serial = queries.get("nvmlDeviceGetSerial")
    if isinstance(serial, str) and serial.isdigit():
        copy["nvmlDeviceGetSerial"] = str(int(serial) + index)
    pci = queries.get("nvmlDeviceGetPciInfo")
    if isinstance(pci, Mapping) and "nvml_error" not in pci:
        domain, bus, device = int(pci["domain"]), int(pci["bus"]), int(pci["device"]) + index
        copy["nvmlDeviceGetPciInfo"] = {
            **pci,
            "device": device,
            "busId": f"{domain:08X}:{bus:02X}:{device:02X}.0",
            "busIdLegacy": f"{domain:04X}:{bus:02X}:{device:02X}.0",
        }
    for key in ("nvmlDeviceGetMinorNumber", "nvmlDeviceGetBoardId"):
        if isinstance(queries.get(key), int):
            copy[key] = int(queries[key]) + index
    return copy


def _smi_rx_kbps(xml_path: Path) -> list[int | None]:
    """``rx_util`` per GPU from ``nvidia-smi -q -x`` ("417 KB/s" -> 417), in GPU order."""
    if not xml_path.is_file():
        return []
    values: list[int | None] = []
    for gpu in ET.parse(xml_path).getroot().iter("gpu"):
        text = gpu.findtext("pci/rx_util") or ""
        match = re.match(r"\s*(\d+)\s*KB/s", text)
        values.append(int(match.group(1)) if match else None)
    return values


class RecordedNvml:
    """Quacks like the ``pynvml`` module, answering from one recorded host.

    ``overrides`` maps a snapshot key (``"nvmlDeviceGetPowerUsage"``,
    ``"nvmlDeviceGetTotalEccErrors(1,0)"``, ``"nvmlInit"``, ...) to the answer to give instead:
    a value in the snapshot's JSON shape, ``NOT_SUPPORTED`` (or any ``{"nvml_error": ...}``
    record), an ``NVMLError`` instance or subclass to raise. Overrides apply to every device.
    ``bytes_strings=True`` returns names, UUIDs and versions as ``bytes``, as pynvml < 11.5 did.
    ``gpus`` replays a host of that many copies of device 0; ``simulate_latency`` sleeps the
    recorded time of each call (``sleep`` is the function that sleeps).

    ``calls`` counts the calls made, by snapshot key, so tests and benchmarks can see what a
    reader asked and how often.

    Faults, injected while the replay runs, on one GPU by index unless said otherwise:
    ``inject_xid``, ``inject_ecc_errors``, ``set_remapped_rows``, ``lose_gpu``,
    ``enable_mig``, ``reset_energy_counter``, ``override``; and for the whole host
    ``unload_driver`` and ``revoke_access``.
    """

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_LibRmVersionMismatch = NVMLError_LibRmVersionMismatch
    NVMLError_Unknown = NVMLError_Unknown

    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_TIMEOUT = NVML_ERROR_TIMEOUT
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = NVML_ERROR_LIB_RM_VERSION_MISMATCH
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = NVML_VOLATILE_ECC
    NVML_DEVICE_MIG_DISABLE = NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE
    NVML_PCIE_UTIL_TX_BYTES = NVML_PCIE_UTIL_TX_BYTES
    NVML_PCIE_UTIL_RX_BYTES = NVML_PCIE_UTIL_RX_BYTES
    nvmlEventTypeDoubleBitEccError = nvmlEventTypeDoubleBitEccError
    nvmlEventTypeXidCriticalError = nvmlEventTypeXidCriticalError

    def __init__(
        self,
        fixture_dir: Path,
        overrides: Mapping[str, Any] | None = None,
        *,
        bytes_strings: bool = False,
        gpus: int | None = None,
        simulate_latency: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.fixture_dir = Path(fixture_dir)
        snapshot_path = self.fixture_dir / "nvml_snapshot.json"
        if not snapshot_path.is_file():
            raise FileNotFoundError(
                f"no NVML recording at {snapshot_path}: expected a folder holding "
                "nvml_snapshot.json (and optionally nvml_timeseries.json)"
            )
        snapshot = json.loads(snapshot_path.read_text())
        self._system: dict[str, Any] = dict(snapshot.get("system", {}))
        recorded = list(snapshot.get("devices", []))
        if gpus is not None and not 1 <= gpus <= _MAX_GPUS:
            raise ValueError(f"gpus must be 1..{_MAX_GPUS}, got {gpus}")
        if gpus is not None and not recorded:
            raise ValueError(f"{snapshot_path} records no device to copy")
        rx_kbps = _smi_rx_kbps(self.fixture_dir / "nvidia-smi-q.xml")
        self._gpus: list[_Gpu] = []
        for index in range(len(recorded) if gpus is None else gpus):
            source = recorded[index] if gpus is None else recorded[0]
            queries = _copy_of(source.get("queries", {}), 0 if gpus is None else index)
            if _PCIE_RX not in queries:
                smi_index = 0 if gpus is not None else index
                rx = rx_kbps[smi_index] if smi_index < len(rx_kbps) else None
                queries[_PCIE_RX] = NOT_SUPPORTED if rx is None else rx
            self._gpus.append(
                _Gpu(queries=queries, event_registration=source.get("event_registration", "ok"))
            )
        series_path = self.fixture_dir / "nvml_timeseries.json"
        self._series: list[dict[str, Any]] = (
            list(json.loads(series_path.read_text()).get("samples", []))
            if series_path.is_file()
            else []
        )
        self.latency_us: dict[str, float] = {
            str(k): float(v) for k, v in snapshot.get("latency_us", {}).items()
        }
        self.calls: Counter[str] = Counter()
        self._overrides: dict[str, Any] = dict(overrides or {})
        self._bytes_strings = bytes_strings
        self._gpu_count = gpus
        self._simulate_latency = simulate_latency
        self._sleep = sleep
        self._cursors: dict[str, int] = {}
        self._init_count = 0
        self._driver_loaded = True
        self._access_revoked = False
        self._event_sets: list[RecordedEventSet] = []

    def with_overrides(self, overrides: Mapping[str, Any]) -> RecordedNvml:
        """A fresh copy (cursors at the start, not initialised, no faults) with more overrides."""
        return RecordedNvml(
            self.fixture_dir,
            {**self._overrides, **overrides},
            bytes_strings=self._bytes_strings,
            gpus=self._gpu_count,
            simulate_latency=self._simulate_latency,
            sleep=self._sleep,
        )

    @property
    def initialized(self) -> bool:
        """True between ``nvmlInit`` and the matching ``nvmlShutdown``."""
        return self._init_count > 0

    def latency_s(self, key: str) -> float:
        """The recorded duration of a call, in seconds; PCIe RX takes what TX took (the same
        20 ms measurement window, other direction); calls the probe did not time take 0."""
        if key == _PCIE_RX and key not in self.latency_us:
            key = "nvmlDeviceGetPcieThroughput(0)"
        return self.latency_us.get(key, 0.0) / 1e6

    # -- faults: states the recordings lack -----------------------------------------------

    def override(self, key: str, value: Any, *, index: int | None = None) -> None:
        """From now on answer ``key`` with ``value`` (same forms as ``overrides``): on GPU
        ``index`` only, or everywhere (system queries included) when ``index`` is None."""
        if index is None:
            self._overrides[key] = value
        else:
            self._gpu_at(index).faults[key] = value

    def inject_xid(self, index: int, xid: int) -> int:
        """Raise XID ``xid`` on GPU ``index``: an XID event for every event set registered for
        that GPU at this moment, as NVML delivers them; returns how many sets received it.

        Only the event: a real XID 79 also makes the GPU stop answering; combine with
        ``lose_gpu`` for that.
        """
        self._gpu_at(index)
        return self._deliver(index, nvmlEventTypeXidCriticalError, xid)

    def inject_ecc_errors(self, index: int, count: int = 1) -> None:
        """``count`` new uncorrected (double-bit) ECC errors on GPU ``index``: the volatile
        uncorrected counter grows by ``count`` and one double-bit ECC event is delivered."""
        gpu = self._gpu_at(index)
        current = gpu.faults.get(_ECC_UNCORRECTED_VOLATILE, gpu.queries[_ECC_UNCORRECTED_VOLATILE])
        gpu.faults[_ECC_UNCORRECTED_VOLATILE] = int(current) + count
        self._deliver(index, nvmlEventTypeDoubleBitEccError, 0)

    def set_remapped_rows(
        self, index: int, *, pending: bool = False, failure: bool = False
    ) -> None:
        """A row remap on GPU ``index`` after one more uncorrectable row: ``pending`` until the
        GPU is reset, or ``failure`` when no spare row was left."""
        gpu = self._gpu_at(index)
        recorded = gpu.queries.get("nvmlDeviceGetRemappedRows")
        corr, unc = recorded[:2] if isinstance(recorded, list | tuple) else (0, 0)
        gpu.faults["nvmlDeviceGetRemappedRows"] = [corr, int(unc) + 1, int(pending), int(failure)]

    def lose_gpu(self, index: int) -> None:
        """GPU ``index`` falls off the bus: every query on it raises ``NVMLError_GpuIsLost``."""
        self._gpu_at(index).lost = True

    def enable_mig(self, index: int, instances: int) -> None:
        """MIG on GPU ``index`` with ``instances`` instances of the smallest profile (1g, an
        eighth of the memory: ``1g.10gb`` on an H100 80GB, ``1g.18gb`` on an H200).

        As on real hardware, the whole GPU then reports no utilisation (NotSupported).
        Instance memory is an eighth of the recorded total, free and used: an approximation,
        the real slices are a little smaller.
        """
        if not 1 <= instances <= _MAX_MIG_INSTANCES:
            raise ValueError(f"instances must be 1..{_MAX_MIG_INSTANCES}, got {instances}")
        gpu = self._gpu_at(index)
        gpu.mig_instances = instances
        gpu.faults["nvmlDeviceGetMigMode"] = [NVML_DEVICE_MIG_ENABLE, NVML_DEVICE_MIG_ENABLE]
        gpu.faults["nvmlDeviceGetMaxMigDeviceCount"] = _MAX_MIG_INSTANCES
        gpu.faults["nvmlDeviceGetUtilizationRates"] = NOT_SUPPORTED

    def reset_energy_counter(self, index: int) -> None:
        """The energy counter of GPU ``index`` restarts from zero (a driver reload does this):
        later readings are the recorded ones minus the last value read before the reset."""
        gpu = self._gpu_at(index)
        baseline = gpu.last_energy
        if baseline is None:
            baseline = int(gpu.queries["nvmlDeviceGetTotalEnergyConsumption"])
        gpu.energy_offset = baseline

    def unload_driver(self) -> None:
        """The NVIDIA driver goes away: ``nvmlInit`` fails with DriverNotLoaded, and every
        other call (the reader's NVML session included) fails with Uninitialized."""
        self._driver_loaded = False

    def revoke_access(self) -> None:
        """This process loses access to the GPUs (a container's device list changed): every
        device query raises NoPermission; the device count still answers."""
        self._access_revoked = True

    # -- plumbing -------------------------------------------------------------------------

    def _gpu_at(self, index: int) -> _Gpu:
        if not 0 <= index < len(self._gpus):
            raise IndexError(f"no GPU {index} in this replay of {len(self._gpus)} GPU(s)")
        return self._gpus[index]

    def _deliver(self, index: int, event_type: int, data: int) -> int:
        reached = 0
        for event_set in self._event_sets:
            if event_set.masks.get(index, 0) & event_type:
                event_set.pending.append(
                    SimpleNamespace(
                        device=RecordedHandle(index),
                        eventType=event_type,
                        eventData=data,
                        gpuInstanceId=_NO_INSTANCE,
                        computeInstanceId=_NO_INSTANCE,
                    )
                )
                reached += 1
        return reached

    def _resolve(self, value: Any) -> Any:
        """Turn a recorded/override value into an answer, raising recorded errors."""
        if isinstance(value, NVMLError):
            raise value
        if isinstance(value, type) and issubclass(value, NVMLError):
            raise value()
        if isinstance(value, Mapping) and "nvml_error" in value:
            raise _error_from_record(value)
        return value

    def _enter(self, key: str) -> None:
        """Every call: count it, take its recorded time, and fail as an uninitialised NVML."""
        self.calls[key] += 1
        if self._simulate_latency:
            delay = self.latency_s(key)
            if delay > 0:
                self._sleep(delay)
        if self._init_count <= 0 or not self._driver_loaded:
            raise NVMLError_Uninitialized()

    def _system_query(self, key: str) -> Any:
        self._enter(key)
        if key in self._overrides:
            return self._resolve(self._overrides[key])
        if key not in self._system:
            raise LookupError(f"no recording for {key} in {self.fixture_dir}")
        return self._resolve(self._system[key])

    def _gpu(self, handle: Any) -> _Gpu:
        """The GPU behind a handle, failing as NVML does for a lost or inaccessible one."""
        if not isinstance(handle, RecordedHandle) or not 0 <= handle.index < len(self._gpus):
            raise NVMLError_InvalidArgument()
        gpu = self._gpus[handle.index]
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        if self._access_revoked:
            raise NVMLError_NoPermission()
        return gpu

    def _device_query(self, handle: Any, name: str, *args: int) -> Any:
        key = _query_key(name, *args)
        self._enter(key)
        if isinstance(handle, RecordedMigHandle):
            return self._resolve(self._mig_answer(handle, key))
        gpu = self._gpu(handle)
        if key in gpu.faults:
            return self._resolve(gpu.faults[key])
        if key in self._overrides:
            return self._resolve(self._overrides[key])
        series_field = _TIME_VARYING.get(key)
        if handle.index == 0 and series_field is not None and self._series:
            position = self._cursors.get(key, 0)
            self._cursors[key] = position + 1
            row = self._series[min(position, len(self._series) - 1)]
            if series_field in row:
                return self._resolve(row[series_field])
        if key not in gpu.queries:
            raise LookupError(f"no recording for {key} on device {handle.index}")
        return self._resolve(gpu.queries[key])

    def _mig_answer(self, handle: RecordedMigHandle, key: str) -> Any:
        """What a MIG instance answers: its own UUID, name and memory; NotSupported otherwise."""
        parent = self._gpu(RecordedHandle(handle.parent))
        name = str(parent.queries["nvmlDeviceGetName"])
        memory = parent.queries["nvmlDeviceGetMemoryInfo"]
        if key == "nvmlDeviceGetUUID":
            return _derived_uuid("MIG", str(parent.queries["nvmlDeviceGetUUID"]), handle.slot)
        if key == "nvmlDeviceGetName":
            slice_gb = math.ceil(marketing_gb(int(memory["total"])) / 8)
            return f"{name} MIG 1g.{slice_gb}gb"
        if key == "nvmlDeviceGetMemoryInfo":
            return {part: int(memory[part]) // 8 for part in ("total", "free", "used")}
        return NOT_SUPPORTED

    def _text(self, value: Any) -> str | bytes:
        text = str(value)
        return text.encode() if self._bytes_strings else text

    # -- the pynvml surface: library and system ----------------------------------------------

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if not self._driver_loaded:
            raise NVMLError_DriverNotLoaded()
        if "nvmlInit" in self._overrides:
            self._resolve(self._overrides["nvmlInit"])
        self._init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        return self._text(self._system_query("nvmlSystemGetDriverVersion"))

    def nvmlSystemGetNVMLVersion(self) -> str | bytes:
        return self._text(self._system_query("nvmlSystemGetNVMLVersion"))

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return int(self._system_query("nvmlSystemGetCudaDriverVersion"))

    def nvmlDeviceGetCount(self) -> int:
        if "nvmlDeviceGetCount" in self._overrides:
            return int(self._system_query("nvmlDeviceGetCount"))
        self._enter("nvmlDeviceGetCount")
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> RecordedHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        handle = RecordedHandle(index)
        self._gpu(handle)
        return handle

    # -- the pynvml surface: inventory ------------------------------------------------------

    def nvmlDeviceGetName(self, handle: RecordedHandle | RecordedMigHandle) -> str | bytes:
        return self._text(self._device_query(handle, "nvmlDeviceGetName"))

    def nvmlDeviceGetUUID(self, handle: RecordedHandle | RecordedMigHandle) -> str | bytes:
        return self._text(self._device_query(handle, "nvmlDeviceGetUUID"))

    def nvmlDeviceGetSerial(self, handle: RecordedHandle) -> str | bytes:
        return self._text(self._device_query(handle, "nvmlDeviceGetSerial"))

    def nvmlDeviceGetPciInfo(self, handle: RecordedHandle) -> SimpleNamespace:
        pci = dict(self._device_query(handle, "nvmlDeviceGetPciInfo"))
        for key in ("busId", "busIdLegacy"):
            pci[key] = self._text(pci[key])
        return SimpleNamespace(**pci)

    def nvmlDeviceGetCudaComputeCapability(self, handle: RecordedHandle) -> tuple[int, int]:
        major, minor = self._device_query(handle, "nvmlDeviceGetCudaComputeCapability")
        return (int(major), int(minor))

    def nvmlDeviceGetMigMode(self, handle: RecordedHandle) -> list[int]:
        return [int(v) for v in self._device_query(handle, "nvmlDeviceGetMigMode")]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: RecordedHandle) -> int:
        return int(self._device_query(handle, "nvmlDeviceGetMaxMigDeviceCount"))

    def nvmlDeviceGetMigDeviceHandleByIndex(
        self, handle: RecordedHandle, index: int
    ) -> RecordedMigHandle:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex")
        gpu = self._gpu(handle)
        if not 0 <= index < gpu.mig_instances:
            raise NVMLError_NotFound()  # no instance in that slot
        return RecordedMigHandle(parent=handle.index, slot=index)

    # -- the pynvml surface: samples and health ---------------------------------------------

    def nvmlDeviceGetMemoryInfo(
        self, handle: RecordedHandle | RecordedMigHandle
    ) -> SimpleNamespace:
        mem = self._device_query(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=mem["total"], free=mem["free"], used=mem["used"])

    def nvmlDeviceGetUtilizationRates(self, handle: RecordedHandle) -> SimpleNamespace:
        util = self._device_query(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=util["gpu"], memory=util["memory"])

    def nvmlDeviceGetTemperature(self, handle: RecordedHandle, sensor: int) -> int:
        return int(self._device_query(handle, "nvmlDeviceGetTemperature", sensor))

    def nvmlDeviceGetPowerUsage(self, handle: RecordedHandle) -> int:
        return int(self._device_query(handle, "nvmlDeviceGetPowerUsage"))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: RecordedHandle) -> int:
        raw = int(self._device_query(handle, "nvmlDeviceGetTotalEnergyConsumption"))
        gpu = self._gpus[handle.index]
        gpu.last_energy = raw
        return max(0, raw - gpu.energy_offset)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: RecordedHandle) -> int:
        return int(self._device_query(handle, "nvmlDeviceGetCurrentClocksThrottleReasons"))

    def nvmlDeviceGetClockInfo(self, handle: RecordedHandle, clock_type: int) -> int:
        return int(self._device_query(handle, "nvmlDeviceGetClockInfo", clock_type))

    def nvmlDeviceGetPcieThroughput(self, handle: RecordedHandle, counter: int) -> int:
        return int(self._device_query(handle, "nvmlDeviceGetPcieThroughput", counter))

    def nvmlDeviceGetTotalEccErrors(
        self, handle: RecordedHandle, error_type: int, counter_type: int
    ) -> int:
        return int(
            self._device_query(handle, "nvmlDeviceGetTotalEccErrors", error_type, counter_type)
        )

    def nvmlDeviceGetRemappedRows(self, handle: RecordedHandle) -> tuple[int, int, int, int]:
        corr, unc, pending, failure = self._device_query(handle, "nvmlDeviceGetRemappedRows")
        return (int(corr), int(unc), int(pending), int(failure))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: RecordedHandle) -> list[SimpleNamespace]:
        procs = self._device_query(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [_process(p) for p in procs]

    # -- the pynvml surface: events ---------------------------------------------------------

    def nvmlEventSetCreate(self) -> RecordedEventSet:
        self._enter("nvmlEventSetCreate")
        event_set = RecordedEventSet()
        self._event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(
        self, handle: RecordedHandle, eventTypes: int, eventSet: RecordedEventSet
    ) -> None:
        self._enter("nvmlDeviceRegisterEvents")
        gpu = self._gpu(handle)
        answer = gpu.faults.get(
            "nvmlDeviceRegisterEvents",
            self._overrides.get("nvmlDeviceRegisterEvents", gpu.event_registration),
        )
        if isinstance(answer, str) and answer != "ok":  # the snapshot records the class name
            answer = {"nvml_error": answer}
        self._resolve(answer)
        eventSet.masks[handle.index] = eventSet.masks.get(handle.index, 0) | int(eventTypes)

    def nvmlEventSetWait_v2(self, eventSet: RecordedEventSet, timeoutms: int) -> SimpleNamespace:
        self._enter("nvmlEventSetWait_v2")
        if "nvmlEventSetWait_v2" in self._overrides:
            self._resolve(self._overrides["nvmlEventSetWait_v2"])
        if eventSet.pending:
            return eventSet.pending.popleft()
        if self._simulate_latency and timeoutms > 0:
            self._sleep(timeoutms / 1000)
        raise NVMLError_Timeout()

    def nvmlEventSetWait(self, eventSet: RecordedEventSet, timeoutms: int) -> SimpleNamespace:
        return self.nvmlEventSetWait_v2(eventSet, timeoutms)

    def nvmlEventSetFree(self, eventSet: RecordedEventSet) -> None:
        self._enter("nvmlEventSetFree")
        if eventSet in self._event_sets:
            self._event_sets.remove(eventSet)
