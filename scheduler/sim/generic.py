"""Traces in the generic CSV format, for any cluster's history.

One row per job; a header row names the columns (any order; unknown columns are refused,
so a typo never silently drops a constraint):

    submit_s            required  submit time, whole seconds from any origin (rows may be
                                  in any order; the replay starts at the earliest)
    duration_s          required  run time in seconds if never stopped (>= 1)
    gpus                required  GPUs of the whole gang (>= 1)
    workers             optional  gang workers; gpus must divide by it (default: gpus <= 8
                                  is one worker, larger gangs are workers of up to 8 GPUs)
    priority            optional  critical | high | normal | low, or a number (default normal)
    gpu_model           optional  e.g. H100, H200-141GB (default: any)
    preemptible         optional  true/false, 1/0, yes/no (default: true, but false for
                                  critical and high)
    team                optional  free text (reported; a tie-breaker)
    checkpoint_s        optional  the job checkpoints every this many seconds of its run
    max_runtime_s       optional  the runtime the user declared (the policy plans with it)
    job_id              optional  an integer id (default: the row number)

Errors name the line and the column: ``trace.csv line 7, gpus: must be a whole number >= 1,
not 'eight'``. The file may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from scheduler.domain.enums import PRIORITY_VALUES, PriorityClass
from scheduler.sim.philly import gang_shape, open_text
from scheduler.sim.replay import TraceJob

REQUIRED = ("submit_s", "duration_s", "gpus")
OPTIONAL = (
    "workers",
    "priority",
    "gpu_model",
    "preemptible",
    "team",
    "checkpoint_s",
    "max_runtime_s",
    "job_id",
)
_TRUE = {"true", "1", "yes", "y"}
_FALSE = {"false", "0", "no", "n"}


class TraceError(ValueError):
    """A trace that cannot be replayed; the message says where and why."""


def is_generic(path: Path) -> bool:
    """Whether the file's header is the generic format's (else: Philly's)."""
    with open_text(path) as f:
        header = next(csv.reader(f), [])
    return set(REQUIRED) <= {h.strip() for h in header}


def load_generic(path: Path, *, limit: int | None = None) -> list[TraceJob]:
    jobs: list[TraceJob] = []
    with open_text(path) as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise TraceError(
                f"{path}: missing column {', '.join(missing)} (a generic trace needs "
                f"{', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})"
            )
        unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
        if unknown:
            raise TraceError(
                f"{path}: unknown column {', '.join(unknown)} (known: "
                f"{', '.join(REQUIRED + OPTIONAL)})"
            )
        rows = []
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            rows.append((line, row))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise TraceError(f"{path}: no jobs (only a header)")
    origin = min(_whole(r["submit_s"], path, line, "submit_s", None) for line, r in rows)
    seen: set[int] = set()
    for index, (line, row) in enumerate(rows):
        jobs.append(_job(row, path, line, index, origin, seen))
    return jobs


def _job(
    row: dict[str, str], path: Path, line: int, index: int, origin: int, seen: set[int]
) -> TraceJob:
    def whole(col: str, minimum: int | None = 1) -> int:
        return _whole(row[col], path, line, col, minimum)

    def optional(col: str, minimum: int = 1) -> int | None:
        return whole(col, minimum) if row.get(col) else None

    gpus = whole("gpus")
    workers = optional("workers")
    if workers is None:
        workers, per = gang_shape(gpus)
    elif gpus % workers:
        raise TraceError(f"{path} line {line}, workers: {gpus} GPUs do not divide into {workers}")
    else:
        per = gpus // workers
    cls, priority = _priority(row.get("priority", ""), path, line)
    preemptible = cls not in (PriorityClass.critical, PriorityClass.high)
    if row.get("preemptible"):
        value = row["preemptible"].lower()
        if value not in _TRUE | _FALSE:
            raise TraceError(
                f"{path} line {line}, preemptible: true or false, not {row['preemptible']!r}"
            )
        preemptible = value in _TRUE
    job_id = optional("job_id", 0)
    job_id = index if job_id is None else job_id
    if job_id in seen:
        raise TraceError(f"{path} line {line}, job_id: {job_id} appears twice")
    seen.add(job_id)
    return TraceJob(
        job_id=job_id,
        submit_s=whole("submit_s", None) - origin,
        duration_s=whole("duration_s"),
        num_workers=workers,
        gpus_per_worker=per,
        priority=priority,
        preemptible=preemptible,
        gpu_model=row.get("gpu_model") or None,
        label=cls.value,
        checkpoint_s=optional("checkpoint_s"),
        max_runtime_s=optional("max_runtime_s"),
        team=row.get("team", ""),
    )


def _priority(text: str, path: Path, line: int) -> tuple[PriorityClass, int]:
    if not text:
        return PriorityClass.normal, PRIORITY_VALUES[PriorityClass.normal]
    try:
        cls = PriorityClass(text.lower())
        return cls, PRIORITY_VALUES[cls]
    except ValueError:
        pass
    try:
        value = int(text)
    except ValueError:
        choices = ", ".join(c.value for c in PriorityClass)
        raise TraceError(
            f"{path} line {line}, priority: {choices} or a number, not {text!r}"
        ) from None
    from scheduler.policy.config import class_of

    return class_of(value), value


def _whole(text: str, path: Path, line: int, col: str, minimum: int | None) -> int:
    try:
        value = float(text)
        if value != int(value):
            raise ValueError
        number = int(value)
    except (ValueError, OverflowError):
        raise TraceError(f"{path} line {line}, {col}: a whole number, not {text!r}") from None
    if minimum is not None and number < minimum:
        raise TraceError(f"{path} line {line}, {col}: must be >= {minimum}, not {number}")
    return number
