"""Evidence windows: what each GPU did, window by window, in the server's time.

The agent samples its GPUs once per heartbeat interval. ``WindowAggregator`` folds those
samples into one ``EvidenceWindow`` per GPU per ``EVIDENCE_WINDOW_S`` seconds, aligned to
the server's clock as the agent estimates it (``agents.clock.ServerClock``), so that the
windows of every node line up with the server's ledger whatever the hosts' clocks say. It
is pure: the time of each sample is passed in, nothing is read or sent here.

Invariants:

- A window is emitted once it is complete: when a sample of a later window arrives, or
  when ``close_due(now_s)`` sees that its end has passed. An open window is never emitted
  early, so a window is never sent twice with different contents.
- A window holds at least one sample. A GPU that gave no sample in a window has no window
  for it: the server reads a missing window as "no evidence", never as "idle".
- The windows of one GPU are emitted in order and never overlap. A sample dated before the
  open window (the estimate of the server's clock stepped back) counts in the open window,
  never in one already emitted.
- Unknown stays unknown (``None``), never zero: utilisation is the mean of the samples that
  answered; ``process_seen`` is None only when no sample could list processes.
- Energy is read from NVML's cumulative counter: the sum of its increments between
  consecutive readings of the GPU, each credited to the window of the later reading. A
  counter that goes down was reset (the driver reloaded): that step counts nothing and
  counting goes on from the new value, so energy is never negative. A step longer than one
  window (sampling stopped for a while) counts nothing either rather than lumping minutes
  into one window. None when no step counted in the window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from agents.gpu.reader import GpuSample
from scheduler.schemas import EVIDENCE_WINDOW_S, EvidenceWindow


@dataclass(slots=True)
class _Open:
    """The window of one GPU that is still collecting samples."""

    start_s: int
    samples: int = 0
    util_sum: int = 0
    util_count: int = 0
    energy_mj: int | None = None
    process_seen: bool | None = None

    def add(self, sample: GpuSample, energy_step_mj: int | None) -> None:
        self.samples += 1
        if sample.utilization_pct is not None:
            self.util_sum += sample.utilization_pct
            self.util_count += 1
        if energy_step_mj is not None:
            self.energy_mj = (self.energy_mj or 0) + energy_step_mj
        processes = _process_count(sample)
        if processes is not None:
            self.process_seen = bool(self.process_seen) or processes > 0

    def window(self, uuid: str, length_s: int) -> EvidenceWindow:
        return EvidenceWindow(
            uuid=uuid,
            start_s=self.start_s,
            end_s=self.start_s + length_s,
            samples=self.samples,
            utilization_pct_avg=(
                round(self.util_sum / self.util_count) if self.util_count else None
            ),
            energy_mj=self.energy_mj,
            process_seen=self.process_seen,
        )


def _process_count(sample: GpuSample) -> int | None:
    if sample.process_count is not None:
        return sample.process_count
    return len(sample.processes) if sample.processes is not None else None


class WindowAggregator:
    """Per-GPU evidence windows from a stream of samples (module docstring)."""

    def __init__(self, window_s: int = EVIDENCE_WINDOW_S) -> None:
        if window_s < 1:
            raise ValueError(f"an evidence window must last at least 1 s, not {window_s}")
        self.window_s = window_s
        self._open: dict[str, _Open] = {}
        self._energy: dict[str, tuple[float, int]] = {}  # uuid -> (at_s, last counter value)
        self._emitted_until: dict[str, int] = {}  # uuid -> end of its last emitted window

    def window_start(self, at_s: float) -> int:
        return math.floor(at_s / self.window_s) * self.window_s

    def add(self, samples: Iterable[GpuSample], at_s: float) -> list[EvidenceWindow]:
        """Fold one round of samples taken at ``at_s`` (server clock, Unix seconds); returns
        the windows this completes, oldest first."""
        done = self.close_due(at_s)
        start = self.window_start(at_s)
        for sample in samples:
            step = self._energy_step(sample, at_s)
            current = self._open.get(sample.uuid)
            if current is None:
                begin = max(start, self._emitted_until.get(sample.uuid, start))
                current = self._open[sample.uuid] = _Open(start_s=begin)
            current.add(sample, step)
        return done

    def close_due(self, now_s: float) -> list[EvidenceWindow]:
        """Emit every open window whose end is at or before ``now_s``, oldest first."""
        due = [
            (w.start_s, uuid, w)
            for uuid, w in self._open.items()
            if w.start_s + self.window_s <= now_s
        ]
        due.sort(key=lambda d: (d[0], d[1]))
        for start_s, uuid, _ in due:
            del self._open[uuid]
            self._emitted_until[uuid] = start_s + self.window_s
        return [w.window(uuid, self.window_s) for _, uuid, w in due]

    def _energy_step(self, sample: GpuSample, at_s: float) -> int | None:
        if sample.energy_mj is None:
            return None  # keep the last reading: the counter goes on meanwhile
        previous = self._energy.get(sample.uuid)
        self._energy[sample.uuid] = (at_s, sample.energy_mj)
        if previous is None:
            return None
        prev_at, prev_mj = previous
        if sample.energy_mj < prev_mj:  # reset: this step is unknown; count on from here
            return None
        if at_s - prev_at > self.window_s:  # too long a step to place in one window
            return None
        return sample.energy_mj - prev_mj
