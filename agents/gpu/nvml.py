"""Reads GPUs through NVML (the ``pynvml`` module of nvidia-ml-py).

``pynvml`` is imported inside ``NvmlReader.__init__`` only, so that the rest of the agent (and
the scheduler, which imports the agent's value types) loads on hosts without NVIDIA drivers.
Any object shaped like the pynvml module can be passed instead, which is how tests and
``--replay`` run this exact code against ``RecordedNvml``.

Invariants:
- a sample field whose query raises ``NVMLError`` is ``None``; NotSupported is "unknown",
  never 0, so a VM that hides power readings does not report a GPU drawing 0 W;
- health is ``failed`` on uncorrected ECC errors, a row-remapping failure or a lost GPU,
  ``degraded`` on a pending row remap, ``ok`` when at least one health query answered cleanly
  and found nothing, and ``unknown`` when no health query could be answered at all;
- ``inventory()`` and ``sample()`` list the same GPUs, in NVML index order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from agents.gpu.reader import GpuInfo, GpuReaderError, GpuSample
from scheduler.domain.enums import GpuHealth
from scheduler.domain.gpu_models import canonical_model

if TYPE_CHECKING:
    from agents.gpu.recorded import RecordedNvml

logger = logging.getLogger(__name__)

_LIBRARY_NOT_FOUND = 12
_DRIVER_NOT_LOADED = 9
_NO_PERMISSION = 4
_NOT_SUPPORTED = 3
_GPU_IS_LOST = 15

_TEMPERATURE_GPU = 0
_MEMORY_ERROR_TYPE_UNCORRECTED = 1
_VOLATILE_ECC = 0
_MIG_ENABLE = 1


def _text(value: Any) -> str:
    """pynvml < 11.5 returns ``bytes`` for names and UUIDs, later versions ``str``."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _error_code(error: BaseException) -> int | None:
    value = getattr(error, "value", None)
    return value if isinstance(value, int) else None


@dataclass(frozen=True, slots=True)
class _Device:
    index: int
    handle: Any
    uuid: str


class NvmlReader:
    """``GpuReader`` over NVML; one instance holds one ``nvmlInit`` until ``close()``.

    ``nvml`` is the pynvml module, or an object with the same functions and ``NVMLError``
    (``RecordedNvml``); ``None`` imports pynvml here. Raises ``GpuReaderError`` when NVML
    cannot be imported or initialised, with a message saying what to do instead.
    """

    def __init__(self, nvml: ModuleType | RecordedNvml | None = None) -> None:
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
        self._devices: list[_Device] | None = None
        self._warned: set[tuple[str, str, int | None]] = set()

    # -- GpuReader -------------------------------------------------------------------------

    def driver_version(self) -> str | None:
        try:
            return _text(self._nvml.nvmlSystemGetDriverVersion())
        except self._error as exc:
            self._warn_once("system", "nvmlSystemGetDriverVersion", exc)
            return None

    def inventory(self) -> list[GpuInfo]:
        """Static facts of every GPU whose identity and memory size NVML can report.

        A GPU whose name or memory cannot be read is left out (with a warning) rather than
        reported with made-up values; the scheduler then sees it as missing.
        """
        infos: list[GpuInfo] = []
        for device in self._discover():
            try:
                name = _text(self._nvml.nvmlDeviceGetName(device.handle))
                memory_total = int(self._nvml.nvmlDeviceGetMemoryInfo(device.handle).total)
            except self._error as exc:
                logger.warning(
                    "GPU %d (%s) left out of the inventory: NVML could not read it: %s",
                    device.index,
                    device.uuid,
                    exc,
                )
                continue
            infos.append(
                GpuInfo(
                    index=device.index,
                    uuid=device.uuid,
                    name=name,
                    model=canonical_model(name, memory_total),
                    memory_total_bytes=memory_total,
                    mig_enabled=self._mig_enabled(device),
                )
            )
        return infos

    def sample(self) -> list[GpuSample]:
        return [self._sample_one(device) for device in self._discover()]

    def close(self) -> None:
        """Release NVML; safe to call twice."""
        if not self._open:
            return
        self._open = False
        try:
            self._nvml.nvmlShutdown()
        except self._error as exc:
            logger.warning("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> NvmlReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _discover(self) -> list[_Device]:
        """Handles and UUIDs, read once: both are stable for the life of an NVML session."""
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
        return devices

    def _mig_enabled(self, device: _Device) -> bool | None:
        """NotSupported means the GPU cannot do MIG, so MIG is certainly off (False)."""
        try:
            current = self._nvml.nvmlDeviceGetMigMode(device.handle)[0]
        except self._error as exc:
            if _error_code(exc) == _NOT_SUPPORTED:
                return False
            self._warn_once(device.uuid, "nvmlDeviceGetMigMode", exc)
            return None
        return int(current) == _MIG_ENABLE

    def _query(self, device: _Device, name: str, *args: int) -> Any:
        """One NVML call on one GPU; ``None`` when it fails, whatever the reason."""
        try:
            return getattr(self._nvml, name)(device.handle, *args)
        except self._error as exc:
            self._warn_once(device.uuid, name, exc)
            return None

    def _warn_once(self, uuid: str, query: str, exc: BaseException) -> None:
        """NotSupported is normal (VMs, older GPUs): log it at debug; other failures warn once."""
        code = _error_code(exc)
        key = (uuid, query, code)
        if key in self._warned:
            return
        self._warned.add(key)
        level = logging.DEBUG if code == _NOT_SUPPORTED else logging.WARNING
        logger.log(level, "NVML %s failed on %s: %s", query, uuid, exc)

    def _sample_one(self, device: _Device) -> GpuSample:
        util = self._query(device, "nvmlDeviceGetUtilizationRates")
        memory = self._query(device, "nvmlDeviceGetMemoryInfo")
        temperature = self._query(device, "nvmlDeviceGetTemperature", _TEMPERATURE_GPU)
        power = self._query(device, "nvmlDeviceGetPowerUsage")
        energy = self._query(device, "nvmlDeviceGetTotalEnergyConsumption")
        processes = self._query(device, "nvmlDeviceGetComputeRunningProcesses")
        health, reasons = self._health(device)
        return GpuSample(
            uuid=device.uuid,
            health=health,
            utilization_pct=None if util is None else int(util.gpu),
            memory_used_bytes=None if memory is None else int(memory.used),
            temperature_c=None if temperature is None else int(temperature),
            power_mw=None if power is None else int(power),
            energy_mj=None if energy is None else int(energy),
            process_count=None if processes is None else len(processes),
            health_reasons=reasons,
        )

    def _health(self, device: _Device) -> tuple[GpuHealth, tuple[str, ...]]:
        failed: list[str] = []
        degraded: list[str] = []
        unanswered: list[str] = []
        answered = 0

        try:
            ecc = int(
                self._nvml.nvmlDeviceGetTotalEccErrors(
                    device.handle, _MEMORY_ERROR_TYPE_UNCORRECTED, _VOLATILE_ECC
                )
            )
        except self._error as exc:
            self._warn_once(device.uuid, "nvmlDeviceGetTotalEccErrors", exc)
            unanswered.append(f"uncorrected ECC error count unavailable ({exc})")
            if _error_code(exc) == _GPU_IS_LOST:
                failed.append("GPU is lost (fell off the bus): it needs a reset or a reboot")
        else:
            answered += 1
            if ecc > 0:
                failed.append(f"{ecc} uncorrected ECC error(s) since the driver loaded")

        try:
            _corr, _unc, pending, failure = self._nvml.nvmlDeviceGetRemappedRows(device.handle)
        except self._error as exc:
            self._warn_once(device.uuid, "nvmlDeviceGetRemappedRows", exc)
            unanswered.append(f"row remapping state unavailable ({exc})")
            if _error_code(exc) == _GPU_IS_LOST and not failed:
                failed.append("GPU is lost (fell off the bus): it needs a reset or a reboot")
        else:
            answered += 1
            if failure:
                failed.append("row remapping failed: the GPU memory has unrepairable rows")
            if pending:
                degraded.append("row remapping pending: the GPU needs a reset to apply it")

        if failed:
            return GpuHealth.failed, tuple(failed + degraded)
        if degraded:
            return GpuHealth.degraded, tuple(degraded)
        if answered == 0:
            return GpuHealth.unknown, tuple(unanswered)
        return GpuHealth.ok, ()


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
    return f"NVML failed to initialise ({exc}): check the NVIDIA driver, or use --simulate"
