"""A stand-in for the ``pynvml`` module that answers from real recordings.

Why: the agent's NVML code must be tested on hosts without GPUs, and a hand-written fake
would encode our assumptions rather than what NVML really returns (which calls fail with
NotSupported on a VM, how the energy counter moves, that utilisation lags a starting load).
``RecordedNvml`` answers from ``nvml_snapshot.json`` and ``nvml_timeseries.json`` recorded on
real H100/H200 machines (see ``tests/fixtures/nvml/README.md``), and is also what
``--replay DIR`` runs the agent against.

Behaviour, in the shape of pynvml:

- static queries return the snapshot's value; a recorded failure is raised as the matching
  ``NVMLError`` subclass (``NVMLError_NotSupported`` with ``.value == 3`` and so on);
- time-varying queries of device 0 (utilisation, memory info, power, energy, temperature,
  compute processes) step through the time series: each query keeps its own cursor that
  advances on every call and stays on the last sample once the recording is exhausted, so a
  reader that asks each query once per round sees the recorded rows in lockstep;
- ``overrides`` replace one query's answer (a value, or an error to raise) to build states
  the recordings lack, such as ECC errors or pending row remaps; they win over both files;
- every device query before ``nvmlInit`` (or after the matching ``nvmlShutdown``) raises
  ``NVMLError_Uninitialized``, as the real library does;
- a query with no recording raises ``LookupError`` rather than an ``NVMLError``, so a reader
  calling it with the wrong arguments fails a test instead of quietly reading "unknown".
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1

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
}


@dataclass(frozen=True, slots=True)
class RecordedHandle:
    """Device handle handed out by ``RecordedNvml`` (pynvml hands out an opaque pointer)."""

    index: int


def _query_key(name: str, *args: int) -> str:
    """The snapshot's key for a call: ``nvmlDeviceGetTotalEccErrors(1,0)``."""
    return f"{name}({','.join(str(a) for a in args)})" if args else name


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


class RecordedNvml:
    """Quacks like the ``pynvml`` module, answering from one recorded host.

    ``overrides`` maps a snapshot key (``"nvmlDeviceGetPowerUsage"``,
    ``"nvmlDeviceGetTotalEccErrors(1,0)"``, ``"nvmlInit"``, ...) to the answer to give instead:
    a value in the snapshot's JSON shape, ``NOT_SUPPORTED`` (or any ``{"nvml_error": ...}``
    record), an ``NVMLError`` instance or subclass to raise. Overrides apply to every device.
    ``bytes_strings=True`` returns names, UUIDs and versions as ``bytes``, as pynvml < 11.5 did.
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
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = NVML_VOLATILE_ECC
    NVML_DEVICE_MIG_DISABLE = NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE

    def __init__(
        self,
        fixture_dir: Path,
        overrides: Mapping[str, Any] | None = None,
        *,
        bytes_strings: bool = False,
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
        self._devices: list[dict[str, Any]] = [
            dict(d.get("queries", {})) for d in snapshot.get("devices", [])
        ]
        series_path = self.fixture_dir / "nvml_timeseries.json"
        self._series: list[dict[str, Any]] = (
            list(json.loads(series_path.read_text()).get("samples", []))
            if series_path.is_file()
            else []
        )
        self._overrides: dict[str, Any] = dict(overrides or {})
        self._bytes_strings = bytes_strings
        self._cursors: dict[str, int] = {}
        self._init_count = 0

    def with_overrides(self, overrides: Mapping[str, Any]) -> RecordedNvml:
        """A fresh copy (cursors at the start, not initialised) with more overrides on top."""
        return RecordedNvml(
            self.fixture_dir,
            {**self._overrides, **overrides},
            bytes_strings=self._bytes_strings,
        )

    @property
    def initialized(self) -> bool:
        """True between ``nvmlInit`` and the matching ``nvmlShutdown``."""
        return self._init_count > 0

    # -- plumbing -------------------------------------------------------------------------

    def _resolve(self, value: Any) -> Any:
        """Turn a recorded/override value into an answer, raising recorded errors."""
        if isinstance(value, NVMLError):
            raise value
        if isinstance(value, type) and issubclass(value, NVMLError):
            raise value()
        if isinstance(value, Mapping) and "nvml_error" in value:
            raise _error_from_record(value)
        return value

    def _require_init(self) -> None:
        if self._init_count <= 0:
            raise NVMLError_Uninitialized()

    def _system_query(self, key: str) -> Any:
        self._require_init()
        if key in self._overrides:
            return self._resolve(self._overrides[key])
        if key not in self._system:
            raise LookupError(f"no recording for {key} in {self.fixture_dir}")
        return self._resolve(self._system[key])

    def _device_query(self, handle: RecordedHandle, name: str, *args: int) -> Any:
        self._require_init()
        key = _query_key(name, *args)
        if key in self._overrides:
            return self._resolve(self._overrides[key])
        if not isinstance(handle, RecordedHandle) or not 0 <= handle.index < len(self._devices):
            raise NVMLError_InvalidArgument()
        field = _TIME_VARYING.get(key)
        if handle.index == 0 and field is not None and self._series:
            position = self._cursors.get(key, 0)
            self._cursors[key] = position + 1
            row = self._series[min(position, len(self._series) - 1)]
            if field in row:
                return self._resolve(row[field])
        queries = self._devices[handle.index]
        if key not in queries:
            raise LookupError(f"no recording for {key} on device {handle.index}")
        return self._resolve(queries[key])

    def _text(self, value: Any) -> str | bytes:
        text = str(value)
        return text.encode() if self._bytes_strings else text

    # -- the pynvml surface ---------------------------------------------------------------

    def nvmlInit(self) -> None:
        if "nvmlInit" in self._overrides:
            self._resolve(self._overrides["nvmlInit"])
        self._init_count += 1

    def nvmlShutdown(self) -> None:
        self._require_init()
        self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        return self._text(self._system_query("nvmlSystemGetDriverVersion"))

    def nvmlDeviceGetCount(self) -> int:
        if "nvmlDeviceGetCount" in self._overrides:
            return int(self._system_query("nvmlDeviceGetCount"))
        self._require_init()
        return len(self._devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> RecordedHandle:
        self._require_init()
        if not 0 <= index < len(self._devices):
            raise NVMLError_InvalidArgument()
        return RecordedHandle(index)

    def nvmlDeviceGetName(self, handle: RecordedHandle) -> str | bytes:
        return self._text(self._device_query(handle, "nvmlDeviceGetName"))

    def nvmlDeviceGetUUID(self, handle: RecordedHandle) -> str | bytes:
        return self._text(self._device_query(handle, "nvmlDeviceGetUUID"))

    def nvmlDeviceGetMemoryInfo(self, handle: RecordedHandle) -> SimpleNamespace:
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
        return int(self._device_query(handle, "nvmlDeviceGetTotalEnergyConsumption"))

    def nvmlDeviceGetMigMode(self, handle: RecordedHandle) -> list[int]:
        return [int(v) for v in self._device_query(handle, "nvmlDeviceGetMigMode")]

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
