"""GPU model names as the scheduler compares them.

NVML reports marketing names ("NVIDIA H100 80GB HBM3", "NVIDIA H200"); jobs ask for short
names ("H100-80GB", "H100"). Both sides are reduced to one canonical form here so that a
constraint written by an engineer matches what an agent reported.
"""

from __future__ import annotations

import re

_FAMILY = re.compile(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b")


def canonical_model(nvml_name: str, memory_bytes: int | None = None) -> str:
    """Map an NVML device name to ``FAMILY-<GiB rounded to a marketing size>GB``.

    ``canonical_model("NVIDIA H100 80GB HBM3")`` -> ``"H100-80GB"``;
    ``canonical_model("NVIDIA H200", 150_754_820_096)`` -> ``"H200-141GB"``.
    """
    return _canonical(nvml_name, memory_bytes)[:MAX_MODEL_LEN]


MAX_MODEL_LEN = 64  # the width of the model columns


def _canonical(nvml_name: str, memory_bytes: int | None) -> str:
    name = nvml_name.upper().replace("NVIDIA", " ").replace("TESLA", " ")
    match = _FAMILY.search(name)
    family = match.group(1) if match else re.sub(r"[^A-Z0-9]+", "-", name).strip("-")
    size = re.search(r"(\d+)\s*GB", name)
    if size:
        return f"{family}-{size.group(1)}GB"
    if memory_bytes:
        return f"{family}-{marketing_gb(memory_bytes)}GB"
    return family


_MARKETING_SIZES = (16, 24, 32, 40, 48, 80, 94, 96, 141, 180, 192, 288)


def marketing_gb(memory_bytes: int) -> int:
    """The marketed size nearest to a reported total (NVML reports a bit less or more)."""
    gib = memory_bytes / 2**30
    gb = memory_bytes / 10**9
    best = min(_MARKETING_SIZES, key=lambda s: min(abs(s - gib), abs(s - gb)))
    if min(abs(best - gib), abs(best - gb)) / best > 0.08:
        return round(gib)
    return best


def model_matches(wanted: str, actual: str) -> bool:
    """True when a job's constraint (``"H100"`` or ``"H100-80GB"``) admits a GPU's model."""
    wanted = wanted.strip().upper()
    actual = actual.upper()
    return actual == wanted or actual.split("-", 1)[0] == wanted
