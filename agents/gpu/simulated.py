"""A GPU reader for hosts without GPUs (``--simulate 4xH100-80GB``).

Why: the scheduler, the agent loop and the accounting must be runnable end to end on a
laptop or in CI. The simulated host behaves like the recorded real ones where it matters to
the scheduler: stable UUIDs in NVML's format, a cumulative energy counter that only grows,
utilisation that follows what the caller says is running.

Invariants:
- deterministic: the same ``spec`` and ``node_name`` give the same UUIDs, and the same clock
  readings give the same samples (there is no randomness);
- ``energy_mj`` never decreases: it integrates each GPU's power over the injected clock, and a
  clock that steps backwards adds nothing;
- ``model`` equals ``canonical_model(name, memory_total_bytes)``, the same function real GPUs
  go through, so constraints written against real hosts match simulated ones.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from agents.gpu.reader import GpuInfo, GpuSample
from scheduler.domain.enums import GpuHealth
from scheduler.domain.gpu_models import canonical_model

logger = logging.getLogger(__name__)

MAX_SIMULATED_GPUS = 16

_SPEC = re.compile(r"^\s*(\d+)\s*[xX]\s*([A-Za-z]{1,2}\d{2,4}[A-Za-z]?)-(\d+)\s*GB\s*$", re.I)
_SPEC_HELP = "expected COUNTxMODEL-MEMGB, e.g. 4xH100-80GB"

# Namespace for simulated GPU UUIDs, so they can never collide with another uuid5 use.
_UUID_NAMESPACE = uuid.UUID("6f1c2a8e-3b9d-5e47-9a10-4c2d7e8b5f31")

BUSY_UTILIZATION_PCT = 95
_IDLE_POWER_MW = 70_000
_BUSY_POWER_MW = 550_000
_IDLE_MEMORY_BYTES = 503_316_480  # what an idle H100 reports with the driver loaded
_BUSY_MEMORY_FRACTION = 0.7
_IDLE_TEMPERATURE_C = 36
_BUSY_TEMPERATURE_C = 58
_INITIAL_ENERGY_MJ = 3_000_000


def parse_gpu_spec(spec: str) -> tuple[int, str, int]:
    """``"4xH100-80GB"`` -> ``(4, "H100-80GB", 80 * 2**30)``.

    Memory is taken as GiB (``GB * 2**30``): NVML totals sit near the GiB figure (an H100
    80GB reports 79.6 GiB), so ``canonical_model`` maps it back to the same marketing size.
    Raises ``ValueError`` naming the expected form, or the allowed count range.
    """
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"bad GPU spec {spec!r}: {_SPEC_HELP}")
    count = int(match.group(1))
    family = match.group(2).upper()
    gb = int(match.group(3))
    if not 1 <= count <= MAX_SIMULATED_GPUS:
        raise ValueError(
            f"bad GPU spec {spec!r}: count must be 1..{MAX_SIMULATED_GPUS}, got {count} "
            f"({_SPEC_HELP})"
        )
    if gb <= 0:
        raise ValueError(f"bad GPU spec {spec!r}: memory must be positive ({_SPEC_HELP})")
    return count, f"{family}-{gb}GB", gb * 2**30


def simulated_uuid(node_name: str, index: int) -> str:
    """NVML-style ``GPU-xxxxxxxx-xxxx-...`` UUID, stable for a node name and GPU index."""
    return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{node_name}/gpu/{index}')}"


@dataclass(slots=True)
class _SimGpu:
    info: GpuInfo
    energy_mj: float
    busy: bool = False
    health: GpuHealth = GpuHealth.ok
    health_reasons: tuple[str, ...] = ()

    @property
    def power_mw(self) -> int:
        return _BUSY_POWER_MW if self.busy else _IDLE_POWER_MW


class SimulatedReader:
    """``GpuReader`` for ``COUNT`` identical simulated GPUs on ``node_name``.

    ``clock`` returns seconds (default ``time.monotonic``); energy is integrated over it.
    ``set_busy`` says which GPUs run work, ``set_health`` injects a failure for tests.
    """

    def __init__(
        self,
        spec: str,
        node_name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        count, model, memory_bytes = parse_gpu_spec(spec)
        family, gb = model.rsplit("-", 1)
        name = f"NVIDIA {family} {gb}"
        if canonical_model(name, memory_bytes) != model:
            raise ValueError(f"bad GPU spec {spec!r}: model {model} does not round-trip")
        self._clock = clock
        self._last_time = clock()
        self._gpus: list[_SimGpu] = [
            _SimGpu(
                info=GpuInfo(
                    index=i,
                    uuid=simulated_uuid(node_name, i),
                    name=name,
                    model=model,
                    memory_total_bytes=memory_bytes,
                    mig_enabled=False,
                ),
                energy_mj=float(_INITIAL_ENERGY_MJ),
            )
            for i in range(count)
        ]
        self._by_uuid = {gpu.info.uuid: gpu for gpu in self._gpus}
        logger.info("simulating %d x %s on node %s", count, model, node_name)

    def driver_version(self) -> str | None:
        return "simulated"

    def cuda_driver_version(self) -> str | None:
        """None: a simulated host has no CUDA driver, and a made-up version would be
        compared with jobs' CUDA requirements as if it were real."""
        return None

    def inventory(self) -> list[GpuInfo]:
        return [gpu.info for gpu in self._gpus]

    def sample(self) -> list[GpuSample]:
        self._advance()
        return [self._sample_one(gpu) for gpu in self._gpus]

    def close(self) -> None:
        """Nothing to release."""

    def set_busy(self, uuids: set[str]) -> None:
        """Mark exactly ``uuids`` busy (the others idle); unknown UUIDs raise ``ValueError``.

        Energy up to now is settled at the old power first, so the counter stays exact.
        """
        self._check_known(uuids)
        self._advance()
        for gpu in self._gpus:
            gpu.busy = gpu.info.uuid in uuids

    def set_health(self, uuid: str, health: GpuHealth, *reasons: str) -> None:
        """Make one GPU report ``health`` (e.g. ``failed``) with ``reasons``, for tests."""
        self._check_known({uuid})
        gpu = self._by_uuid[uuid]
        gpu.health = health
        gpu.health_reasons = tuple(reasons)

    def _check_known(self, uuids: set[str]) -> None:
        unknown = sorted(uuids - self._by_uuid.keys())
        if unknown:
            raise ValueError(f"no simulated GPU with UUID {', '.join(unknown)}")

    def _advance(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last_time)
        self._last_time = max(now, self._last_time)
        for gpu in self._gpus:
            gpu.energy_mj += gpu.power_mw * elapsed  # mW * s = mJ

    def _sample_one(self, gpu: _SimGpu) -> GpuSample:
        total = gpu.info.memory_total_bytes
        return GpuSample(
            uuid=gpu.info.uuid,
            health=gpu.health,
            utilization_pct=BUSY_UTILIZATION_PCT if gpu.busy else 0,
            memory_used_bytes=int(total * _BUSY_MEMORY_FRACTION)
            if gpu.busy
            else min(_IDLE_MEMORY_BYTES, total),
            temperature_c=_BUSY_TEMPERATURE_C if gpu.busy else _IDLE_TEMPERATURE_C,
            power_mw=gpu.power_mw,
            energy_mj=int(gpu.energy_mj),
            process_count=1 if gpu.busy else 0,
            health_reasons=gpu.health_reasons,
        )
