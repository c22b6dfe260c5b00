"""How a node agent reads its GPUs: real NVML, a replay of real recordings, or a simulation.

``open_reader`` is the one place that picks the source, so the agent's command line
(``--simulate SPEC`` / ``--replay DIR`` / neither) maps to readers the same way everywhere.
Importing this package never imports ``pynvml``; only ``NvmlReader()`` does.
"""

from __future__ import annotations

from pathlib import Path

from agents.gpu.nvml import NvmlReader
from agents.gpu.reader import (
    GpuInfo,
    GpuProcess,
    GpuReader,
    GpuReaderError,
    GpuSample,
    MigInstance,
)
from agents.gpu.recorded import NOT_SUPPORTED, RecordedNvml
from agents.gpu.simulated import SimulatedReader, parse_gpu_spec, simulated_uuid

__all__ = [
    "NOT_SUPPORTED",
    "GpuInfo",
    "GpuProcess",
    "GpuReader",
    "GpuReaderError",
    "GpuSample",
    "MigInstance",
    "NvmlReader",
    "RecordedNvml",
    "SimulatedReader",
    "open_reader",
    "parse_gpu_spec",
    "simulated_uuid",
]


def open_reader(*, simulate: str | None, replay: Path | None, node_name: str) -> GpuReader:
    """The reader for the agent's options: ``simulate`` spec, ``replay`` folder, or real NVML.

    At most one of ``simulate`` and ``replay`` may be given. Raises ``GpuReaderError`` when
    the chosen source cannot be opened, and ``ValueError`` for a bad simulate spec.
    """
    if simulate is not None and replay is not None:
        raise ValueError("choose one of --simulate and --replay, not both")
    if simulate is not None:
        return SimulatedReader(simulate, node_name)
    if replay is not None:
        try:
            recorded = RecordedNvml(replay)
        except (OSError, ValueError) as exc:
            raise GpuReaderError(f"cannot replay NVML recordings from {replay}: {exc}") from exc
        return NvmlReader(recorded)
    return NvmlReader()
