"""Load the Microsoft Philly trace (Pollux's processed CSV) as replayable jobs.

The CSV ships with the package, gzip-compressed (``scheduler/sim/traces/philly.csv.gz``;
provenance and licence in ``scheduler/sim/traces/README.md``). It has columns
``timestamp`` (naive local submit time), ``duration`` (seconds, float), ``num_gpus``,
``gpu_time`` and ``cluster`` (a virtual cluster hash, a stand-in for a team). It carries
no priority, GPU model or provider, so:

* Priority: each virtual cluster gets one priority class from a SEEDED hash,
  ``sha256(f"{seed}:{cluster}")`` read as an integer, modulo 100, mapped to
  critical [0, 10), high [10, 30), normal [30, 70), low [70, 100). A team keeps one class,
  as it would in a real deployment. The default ``PRIORITY_SEED = 3`` was chosen because it
  gives the early part of the trace all four classes (on the first 3,000 jobs: about 2,230
  low, 660 normal, 90 high, 16 critical); results reproduce for the same seed.
* Preemptible: critical and high jobs are not preemptible; normal and low jobs are.
* Gang shape: a job of ``n <= 8`` GPUs is one worker of ``n`` GPUs. A larger job is split
  into workers of ``w`` GPUs, ``w`` the largest divisor of ``n`` that is at most 8 (workers
  of 8 for every size in the trace except 12, which becomes 2 x 6), so GPU counts are kept.
* No GPU model constraint (the trace has none).
* Times: rows are sorted by timestamp (file order breaks ties); ``submit_s`` counts seconds
  from the first kept row; ``duration`` is rounded to whole seconds, at least 1.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
from datetime import datetime
from pathlib import Path
from typing import TextIO

from scheduler.domain.enums import PRIORITY_VALUES, PriorityClass
from scheduler.sim.replay import TraceJob

PRIORITY_SEED = 3
MAX_GPUS_PER_WORKER = 8
_NOT_PREEMPTIBLE = frozenset({PriorityClass.critical, PriorityClass.high})


PACKAGED_TRACE = Path(__file__).resolve().parent / "traces" / "philly.csv.gz"


def default_trace_path() -> Path:
    """``$ANDROMEDA_PHILLY`` if set, else the trace shipped with the package."""
    env = os.environ.get("ANDROMEDA_PHILLY")
    return Path(env) if env else PACKAGED_TRACE


def open_text(path: Path) -> TextIO:
    """A CSV file, plain or gzip-compressed (by its ``.gz`` suffix), as text."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(newline="", encoding="utf-8")


def priority_class(cluster: str, seed: int = PRIORITY_SEED) -> PriorityClass:
    """The seeded, reproducible priority class of a virtual cluster (see module docstring)."""
    digest = hashlib.sha256(f"{seed}:{cluster}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    if bucket < 10:
        return PriorityClass.critical
    if bucket < 30:
        return PriorityClass.high
    if bucket < 70:
        return PriorityClass.normal
    return PriorityClass.low


def gang_shape(num_gpus: int) -> tuple[int, int]:
    """(workers, GPUs per worker) for a gang of ``num_gpus``; the product is ``num_gpus``."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    per_worker = max(d for d in range(1, MAX_GPUS_PER_WORKER + 1) if num_gpus % d == 0)
    return num_gpus // per_worker, per_worker


def load_philly(
    path: Path,
    *,
    limit: int | None = None,
    start: str | None = None,
    seed: int = PRIORITY_SEED,
) -> list[TraceJob]:
    """Load up to ``limit`` jobs submitted at or after ``start`` (ISO time), in submit order.

    Raises FileNotFoundError with the expected location when the trace is missing.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"Philly trace not found at {path}; set ANDROMEDA_PHILLY to a philly.csv(.gz) file"
        )
    since = datetime.fromisoformat(start) if start else None
    rows: list[tuple[datetime, int, dict[str, str]]] = []
    with open_text(path) as fh:
        for index, row in enumerate(csv.DictReader(fh)):
            stamp = datetime.fromisoformat(row["timestamp"])
            if since is None or stamp >= since:
                rows.append((stamp, index, row))
    rows.sort(key=lambda r: (r[0], r[1]))
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        return []
    origin = rows[0][0]
    jobs: list[TraceJob] = []
    for job_id, (stamp, _index, row) in enumerate(rows):
        cls = priority_class(row["cluster"], seed)
        workers, per_worker = gang_shape(int(row["num_gpus"]))
        jobs.append(
            TraceJob(
                job_id=job_id,
                submit_s=int((stamp - origin).total_seconds()),
                duration_s=max(1, round(float(row["duration"]))),
                num_workers=workers,
                gpus_per_worker=per_worker,
                priority=PRIORITY_VALUES[cls],
                preemptible=cls not in _NOT_PREEMPTIBLE,
                label=cls.value,
            )
        )
    return jobs
