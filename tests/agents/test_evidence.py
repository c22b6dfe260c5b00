"""Evidence windows from GPU samples: a table of sample streams and the windows they make."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agents.evidence import WindowAggregator
from agents.gpu.reader import GpuProcess, GpuSample
from scheduler.domain.enums import GpuHealth
from scheduler.schemas import EVIDENCE_WINDOW_S

A, B = "GPU-aaaa", "GPU-bbbb"


def s(
    uuid: str = A,
    util: int | None = 50,
    energy: int | None = None,
    procs: int | None = 0,
    process_list: tuple[GpuProcess, ...] | None = None,
) -> GpuSample:
    return GpuSample(
        uuid=uuid,
        health=GpuHealth.ok,
        utilization_pct=util,
        memory_used_bytes=None,
        temperature_c=None,
        power_mw=None,
        energy_mj=energy,
        process_count=procs,
        processes=process_list,
    )


@dataclass
class Case:
    name: str
    # (at_s, samples) folds a round of samples; (at_s, None) asks for windows due at at_s
    events: list[tuple[float, list[GpuSample] | None]]
    # (uuid, start_s, samples, utilization_pct_avg, energy_mj, process_seen)
    want: list[tuple[str, int, int, int | None, int | None, bool | None]]
    window_s: int = EVIDENCE_WINDOW_S


CASES = [
    Case(
        "three samples make one window, emitted when a sample of the next arrives",
        [
            (0, [s(util=10, energy=0, procs=0)]),
            (10, [s(util=20, energy=100, procs=1)]),
            (20, [s(util=30, energy=300, procs=0)]),
            (60, [s()]),
        ],
        [(A, 0, 3, 20, 300, True)],
    ),
    Case(
        "a window is not emitted before its end, and is at its end",
        [(0, [s()]), (59.9, None), (60, None)],
        [(A, 0, 1, 50, None, False)],
    ),
    Case(
        "utilisation is the mean of the samples that answered, rounded",
        [(0, [s(util=None)]), (10, [s(util=33)]), (20, [s(util=34)]), (60, None)],
        [(A, 0, 3, 34, None, False)],
    ),
    Case(
        "utilisation is unknown when no sample answered",
        [(0, [s(util=None)]), (10, [s(util=None)]), (60, None)],
        [(A, 0, 2, None, None, False)],
    ),
    Case(
        "the first reading of the counter gives no energy: None, not 0",
        [(0, [s(energy=5_000)]), (60, None)],
        [(A, 0, 1, 50, None, False)],
    ),
    Case(
        "energy across a boundary is credited to the later reading's window",
        [(50, [s(energy=0)]), (70, [s(energy=200)]), (80, [s(energy=250)]), (120, None)],
        [(A, 0, 1, 50, None, False), (A, 60, 2, 50, 250, False)],
    ),
    Case(
        "a counter that goes down was reset: that step counts nothing, counting goes on",
        [
            (0, [s(energy=1_000)]),
            (10, [s(energy=1_500)]),
            (20, [s(energy=200)]),
            (30, [s(energy=300)]),
            (60, None),
        ],
        [(A, 0, 4, 50, 600, False)],
    ),
    Case(
        "a reset as the only step leaves the energy unknown, never negative",
        [(0, [s(energy=1_000)]), (10, [s(energy=10)]), (60, None)],
        [(A, 0, 2, 50, None, False)],
    ),
    Case(
        "a step longer than a window counts nothing rather than lumping minutes together",
        [(0, [s(energy=0)]), (130, [s(energy=100_000)]), (140, [s(energy=100_100)]), (180, None)],
        [(A, 0, 1, 50, None, False), (A, 120, 2, 50, 100, False)],
    ),
    Case(
        "an unknown energy reading keeps the previous one for the next step",
        [(0, [s(energy=0)]), (10, [s(energy=None)]), (20, [s(energy=40)]), (60, None)],
        [(A, 0, 3, 50, 40, False)],
    ),
    Case(
        "processes unknown in every sample: process_seen is None",
        [(0, [s(procs=None)]), (10, [s(procs=None)]), (60, None)],
        [(A, 0, 2, 50, None, None)],
    ),
    Case(
        "one known count of zero is a fact: process_seen is False",
        [(0, [s(procs=None)]), (10, [s(procs=0)]), (60, None)],
        [(A, 0, 2, 50, None, False)],
    ),
    Case(
        "the process list stands in for a missing count",
        [
            (0, [s(procs=None, process_list=(GpuProcess(pid=7, used_memory_bytes=None),))]),
            (60, None),
        ],
        [(A, 0, 1, 50, None, True)],
    ),
    Case(
        "a minute without samples has no window: no evidence, not idle",
        [(0, [s()]), (130, [s()]), (180, None)],
        [(A, 0, 1, 50, None, False), (A, 120, 1, 50, None, False)],
    ),
    Case(
        "a sample dated before the open window (clock stepped back) counts in it",
        [(65, [s(util=10)]), (58, [s(util=30)]), (120, None)],
        [(A, 60, 2, 20, None, False)],
    ),
    Case(
        "a window already emitted is never reopened by a sample dated inside it",
        [(10, [s()]), (60, None), (55, [s(util=0)]), (120, None)],
        [(A, 0, 1, 50, None, False), (A, 60, 1, 0, None, False)],
    ),
    Case(
        "GPUs are windowed apart and emitted oldest first, then by UUID",
        [
            (0, [s(B, util=80), s(A, util=20)]),
            (61, [s(B, util=90)]),
            (125, None),
        ],
        [(A, 0, 1, 20, None, False), (B, 0, 1, 80, None, False), (B, 60, 1, 90, None, False)],
    ),
    Case(
        "windows align to multiples of their length on the server's clock",
        [(1_800_000_017.5, [s()]), (1_800_000_101, None)],
        [(A, 1_800_000_000, 1, 50, None, False)],
        window_s=60,
    ),
    Case(
        "a shorter window length aligns the same way",
        [(3.2, [s()]), (4.9, [s()]), (6.1, [s()]), (10, None)],
        [(A, 0, 2, 50, None, False), (A, 5, 1, 50, None, False)],
        window_s=5,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_samples_fold_into_windows(case: Case) -> None:
    agg = WindowAggregator(case.window_s)
    got = []
    for at, samples in case.events:
        got += agg.add(samples, at) if samples is not None else agg.close_due(at)
    assert [
        (w.uuid, w.start_s, w.samples, w.utilization_pct_avg, w.energy_mj, w.process_seen)
        for w in got
    ] == case.want
    assert all(w.end_s == w.start_s + case.window_s for w in got)


def test_a_window_shorter_than_a_second_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 s, not 0"):
        WindowAggregator(0)
