"""Benchmark what reading the GPUs costs a node agent, on the real NVML recordings.

Usage (from the repository root)::

    .venv/bin/python bench/bench_agent.py [--gpus 8] [--samples 30] [--interval-s 10]

Runs the real ``NvmlReader`` over ``RecordedNvml`` replaying the H100 and H200 recordings
(tests/fixtures/nvml/) as hosts of ``--gpus`` GPUs, with each NVML call taking the time the
probe measured on the real machine (``latency_us``; simulated by sleeping).

- Table 1, per NVML call: the recorded latency on each machine, the replay's wall time per
  call (median of ``--calls`` calls), when the reader makes the call, and what it adds to one
  sample of the host at the default cadence.
- Table 2, per heartbeat sample: the baseline reads every field every sample
  (``costly_every=1``), measured in the same run, against the cadence (``costly_every=30``),
  and the cadence plus building and serialising the heartbeat body through the agent's own
  ``Agent.heartbeat_once`` (the HTTP call replaced by JSON encoding). CPU is
  ``time.process_time``; the simulated latency is sleep, so it shows in wall time and not in
  CPU. What NVML spends inside the driver is unknown here (mostly waiting on the GPU's
  firmware, partly CPU), so the table also gives the share of a core if all of it were CPU:
  an upper bound. ``--samples`` should be a multiple of 30, so the cadence's one costly
  sample in 30 is counted in proportion.

Goal: under 1 % of one core at one heartbeat per 10 s. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.gpu import NvmlReader, RecordedNvml  # noqa: E402
from agents.gpu.nvml import (  # noqa: E402
    COSTLY_EVERY,
    COSTLY_QUERIES,
    EVENT_BACKED_QUERIES,
    EVERY_SAMPLE_QUERIES,
    INVENTORY_QUERIES,
)
from agents.gpu.recorded import parse_query_key  # noqa: E402
from common import logger  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nvml"
RECORDINGS = {"H100": FIXTURES / "h100-80gb-hbm3", "H200": FIXTURES / "h200-141gb"}

PER_HOST = ("nvmlDeviceGetCount",)  # once per sample for the whole host


log = logger()


def call_of(nvml: RecordedNvml, key: str) -> Callable[[], Any]:
    """The replay call behind a snapshot key: ``nvmlDeviceGetTemperature(0)`` on GPU 0."""
    name, args = parse_query_key(key)
    function = getattr(nvml, name)
    if name.startswith("nvmlSystem") or name == "nvmlDeviceGetCount":
        return lambda: function(*args)
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    return lambda: function(handle, *args)


def replayed_us(path: Path, key: str, calls: int) -> float:
    """Median wall time of one replayed call, simulated latency on."""
    nvml = RecordedNvml(path, simulate_latency=True)
    nvml.nvmlInit()
    call = call_of(nvml, key)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        with contextlib.suppress(nvml.NVMLError):
            call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


class SerialisingClient:
    """Stands in for ``ApiClient``: encodes the body as the HTTP call would, sends nothing."""

    def __init__(self) -> None:
        self.bytes_sent = 0

    def heartbeat(self, name: str, body: Any) -> SimpleNamespace:
        self.bytes_sent += len(json.dumps(body.model_dump(mode="json")))
        return SimpleNamespace(gpus=[])

    def post_evidence(self, name: str, body: Any) -> SimpleNamespace:
        self.bytes_sent += len(json.dumps(body.model_dump(mode="json")))
        return SimpleNamespace(stored=0, duplicates=0, credited_gpu_seconds=0)


@dataclass(frozen=True)
class Row:
    what: str
    wall_ms: float  # per sample, simulated latency on
    nvml_ms: float  # recorded NVML time of the calls made, per sample
    cpu_ms: float  # process CPU per sample, simulated latency on (sleep syscalls included)
    cpu_bare_ms: float  # process CPU per sample without simulated latency


def step_for(reader: NvmlReader, heartbeat: bool, tmp: Path) -> Callable[[], object]:
    if not heartbeat:
        return reader.sample
    from agents.agent import Agent, AgentOptions

    client = SerialisingClient()
    agent = Agent(client, reader, AgentOptions(node_name="bench-node", data_dir=tmp))  # type: ignore[arg-type]
    return agent.heartbeat_once


def run(path: Path, args: argparse.Namespace, *, costly_every: int, heartbeat: bool) -> Row:
    def timed(latency: bool, samples: int) -> tuple[float, float, float]:
        with tempfile.TemporaryDirectory() as tmp:
            nvml = RecordedNvml(path, gpus=args.gpus, simulate_latency=latency)
            reader = NvmlReader(nvml, costly_every=costly_every)
            reader.inventory()
            step = step_for(reader, heartbeat, Path(tmp))
            nvml.calls.clear()
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(samples):
                step()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            nvml_s = sum(nvml.latency_s(key) * n for key, n in nvml.calls.items())
            reader.close()
        return wall / samples * 1e3, cpu / samples * 1e3, nvml_s / samples * 1e3

    timed(False, 2 * COSTLY_EVERY)  # warm up: imports, pydantic's validators
    wall_ms, cpu_ms, nvml_ms = timed(True, args.samples)
    _wall, cpu_bare_ms, _nvml = timed(False, args.samples * 10)
    if costly_every == 1:
        what = "every field every sample (baseline)"
    else:
        what = f"cadence, costly_every={costly_every}" + (" + heartbeat_once" if heartbeat else "")
    return Row(what, wall_ms, nvml_ms, cpu_ms, cpu_bare_ms)


def per_call_table(args: argparse.Namespace) -> None:
    keys = [
        *PER_HOST,
        *EVERY_SAMPLE_QUERIES,
        *EVENT_BACKED_QUERIES,
        *COSTLY_QUERIES,
        *INVENTORY_QUERIES,
    ]
    recorded = {m: RecordedNvml(p) for m, p in RECORDINGS.items()}
    print(
        f"Table 1: NVML calls of one sample, recorded latency and the replay's, "
        f"{args.gpus}-GPU host, cadence costly_every={COSTLY_EVERY}"
    )
    print(
        "call                                      | H100 us | H200 us | replay us | when          "
        "| calls/sample | H100 us/sample"
    )
    print(
        "------------------------------------------+---------+---------+-----------+---------------"
        "+--------------+---------------"
    )
    total = 0.0
    for key in keys:
        if key in PER_HOST:
            when, per_sample = "every sample", 1.0
        elif key in EVERY_SAMPLE_QUERIES:
            when, per_sample = "every sample", float(args.gpus)
        elif key in COSTLY_QUERIES or key in EVENT_BACKED_QUERIES:
            when, per_sample = f"every {COSTLY_EVERY}th", args.gpus / COSTLY_EVERY
        else:
            when, per_sample = "inventory", 0.0
        h100, h200 = (recorded[m].latency_s(key) * 1e6 for m in ("H100", "H200"))
        log(f"replaying {key}")
        replay = replayed_us(RECORDINGS["H100"], key, args.calls)
        cost = h100 * per_sample
        total += cost
        note = {"nvmlDeviceGetPcieThroughput(1)": " (TX's)", EVENT_BACKED_QUERIES[0]: " *"}.get(
            key, ""
        )
        print(
            f"{key + note:<42}| {h100:7.1f} | {h200:7.1f} | {replay:9.1f} | {when:<14}"
            f"| {per_sample:12.2f} | {cost:13.0f}"
        )
    print(
        f"{'total, one sample of the host':<42}|{'|'.join(' ' * w for w in (9, 9, 11, 15, 14))}"
        f"| {total:13.0f}"
    )
    print(
        "(* every sample on a GPU whose double-bit ECC events cannot be watched; both "
        "recorded GPUs watch them. The probe did not call nvmlDeviceGetPcieThroughput(1): the "
        "replay gives RX the TX latency, the same 20 ms window. Event-set polls, one per "
        "sample, were not timed: 0 here.)"
    )


def sample_table(args: argparse.Namespace) -> None:
    interval_ms = args.interval_s * 1e3
    print()
    print(
        f"Table 2: one heartbeat sample of {args.gpus} GPUs, {args.samples} samples per row, "
        f"recorded NVML latency simulated (sleep); core share at one sample per "
        f"{args.interval_s:g} s"
    )
    print(
        "GPU  | reader                                    | wall ms | NVML ms | CPU ms "
        "| CPU ms bare | core % CPU | core % CPU+NVML | ratio CPU+NVML"
    )
    print(
        "-----+-------------------------------------------+---------+---------+--------"
        "+-------------+------------+-----------------+---------------"
    )
    for model, path in RECORDINGS.items():
        rows = []
        for costly_every, heartbeat in ((1, False), (COSTLY_EVERY, False), (COSTLY_EVERY, True)):
            log(f"{model}: costly_every={costly_every} heartbeat={heartbeat}")
            try:
                rows.append(run(path, args, costly_every=costly_every, heartbeat=heartbeat))
            except Exception as exc:  # the agent is edited elsewhere: report, keep the rest
                log(f"  skipped: {type(exc).__name__}: {exc}")
        base = rows[0].cpu_ms + rows[0].nvml_ms
        for row in rows:
            upper = row.cpu_ms + row.nvml_ms
            print(
                f"{model:<5}| {row.what:<42}| {row.wall_ms:7.1f} | {row.nvml_ms:7.1f} "
                f"| {row.cpu_ms:6.2f} | {row.cpu_bare_ms:11.2f} "
                f"| {row.cpu_ms / interval_ms * 100:10.3f} | {upper / interval_ms * 100:15.2f} "
                f"| {upper / base:13.2f}"
            )
    print(
        "(wall and NVML ms include the NVML time; CPU ms is this process's CPU with latency "
        "simulated, sleep syscalls included; bare: the same without simulated latency. "
        "Goal: under 1 % of one core.)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--samples", type=int, default=COSTLY_EVERY)
    parser.add_argument("--calls", type=int, default=20, help="replayed calls per table-1 row")
    parser.add_argument("--interval-s", type=float, default=10.0)
    args = parser.parse_args()
    per_call_table(args)
    sample_table(args)


if __name__ == "__main__":
    main()
