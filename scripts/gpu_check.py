"""Everything only a real GPU can show, in one run, ending in a short table:

1. the NVML reader on the real GPUs: inventory (compute capability, PCI bus id, serial, MIG
   and its instances, driver and CUDA driver versions), the XID and ECC events it watches,
   health with its reasons, one sample (throttle reasons, processes, PCIe throughput), and
   what NVML costs on this card: wall and CPU time of each call the reader makes, and of
   whole samples at the reader's cadence;
2. the whole loop on real hardware: the control plane, an agent reading NVML (no
   --simulate) that starts its site's Ray head with its node's labels, the scheduler placing
   examples/gpu/gpu-smoke.yaml on that node, the site's agent pulling it and running it,
   the job multiplying bf16 matrices on the GPU the scheduler chose, the agent's heartbeats
   seeing the GPU busy, and the GPU-seconds in the ledger.

Run through scripts/gpu_check.sh on the device machine. Dry runs on a machine without GPUs:
`--simulate SPEC` runs the same flow on simulated GPUs (the NVML part then has no per-call
cost, and the job fails for lack of CUDA, which the table shows); `--replay DIR` reads the
NVML part from a recording (tests/fixtures/nvml/...) with its recorded per-call latency.
Part 2 is skipped, and says so, where its packages (Ray, SQLModel, FastAPI) are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.gpu import (  # noqa: E402
    GpuReader,
    GpuReaderError,
    NvmlReader,
    RecordedNvml,
    SimulatedReader,
)
from agents.gpu.nvml import (  # noqa: E402
    COSTLY_EVERY,
    COSTLY_QUERIES,
    EVENT_BACKED_QUERIES,
    EVERY_SAMPLE_QUERIES,
    INVENTORY_QUERIES,
)
from agents.gpu.recorded import parse_query_key  # noqa: E402

HEARTBEAT_S = 10.0
rows: list[tuple[str, str]] = []


def say(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def timed(call: Callable[[], object], nvml_error: type[BaseException]) -> tuple[float, float]:
    """Wall and CPU (this thread) seconds of one call; an NVML error still counts as a call."""
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    with contextlib.suppress(nvml_error):
        call()
    return time.perf_counter() - wall0, time.thread_time() - cpu0


def per_call_costs(nvml: Any, calls: int) -> None:
    """Median wall and CPU time of every NVML call the reader makes, on GPU 0."""
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    keys = [
        "nvmlDeviceGetCount",
        *EVERY_SAMPLE_QUERIES,
        *EVENT_BACKED_QUERIES,
        *COSTLY_QUERIES,
        *INVENTORY_QUERIES,
    ]
    measured: list[tuple[str, Callable[[], object]]] = []
    for key in keys:
        name, args = parse_query_key(key)
        function = getattr(nvml, name)
        if name == "nvmlDeviceGetCount":
            measured.append((key, function))
        else:
            measured.append((key, lambda f=function, a=args: f(handle, *a)))
    events = None
    try:
        events = nvml.nvmlEventSetCreate()
        nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
        measured.append(
            ("nvmlEventSetWait_v2(timeout 0)", lambda: nvml.nvmlEventSetWait_v2(events, 0))
        )
    except nvml.NVMLError as exc:
        rows.append(("nvml events", f"cannot be watched here: {exc}"))
    for key, call in measured:
        times = [timed(call, nvml.NVMLError) for _ in range(calls)]
        wall = statistics.median(t[0] for t in times) * 1e6
        cpu = statistics.median(t[1] for t in times) * 1e6
        rows.append((f"  {key}", f"{wall:8.1f} us wall, {cpu:8.1f} us CPU"))
    if events is not None:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlEventSetFree(events)


def describe_inventory(reader: GpuReader) -> int:
    inventory = reader.inventory()
    rows.append(("nvml driver", f"{reader.driver_version()} (CUDA {reader.cuda_driver_version()})"))
    for gpu in inventory:
        rows.append((f"gpu {gpu.index}", f"{gpu.name} ({gpu.model}) {gpu.uuid}"))
        mig = {True: "on", False: "off", None: "unknown"}[gpu.mig_enabled]
        instances = ", ".join(f"{i.profile} {i.uuid}" for i in gpu.mig_instances)
        rows.append(
            (
                f"gpu {gpu.index} identity",
                f"compute {gpu.compute_capability}, PCI {gpu.pci_bus_id}, serial {gpu.serial}, "
                f"MIG {mig}" + (f" ({len(gpu.mig_instances)}: {instances})" if instances else ""),
            )
        )
    if isinstance(reader, NvmlReader):
        watched = reader.watched_events()
        kinds = sorted({" + ".join(k) or "none" for k in watched.values()})
        rows.append(("events watched", f"{', '.join(kinds)} on {len(watched)} GPU(s)"))
    return len(inventory)


def describe_samples(reader: GpuReader, count: int) -> None:
    """The reader's first samples, timed: the first reads the costly fields, the next
    nine do not, as the agent's cadence makes them."""
    timings: list[tuple[float, float]] = []
    samples = []
    for _ in range(10):
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        samples.append(reader.sample()[0])
        timings.append((time.perf_counter() - wall0, time.thread_time() - cpu0))
    (costly_wall, costly_cpu), cheap = timings[0], timings[1:]
    cheap_wall = statistics.median(t[0] for t in cheap)
    cheap_cpu = statistics.median(t[1] for t in cheap)
    rows.append(
        (
            "sample() with PCIe",
            f"{costly_wall * 1e3:.1f} ms wall, {costly_cpu * 1e3:.2f} ms CPU for {count} GPU(s)",
        )
    )
    rows.append(
        (
            "sample() cheap",
            f"{cheap_wall * 1e3:.1f} ms wall, {cheap_cpu * 1e3:.2f} ms CPU (median of 9)",
        )
    )
    per_sample_cpu = (costly_cpu + (COSTLY_EVERY - 1) * cheap_cpu) / COSTLY_EVERY
    per_sample_wall = (costly_wall + (COSTLY_EVERY - 1) * cheap_wall) / COSTLY_EVERY
    rows.append(
        (
            "share of one core",
            f"{per_sample_cpu / HEARTBEAT_S * 100:.3f} % CPU at one sample per "
            f"{HEARTBEAT_S:.0f} s ({per_sample_wall / HEARTBEAT_S * 100:.2f} % if all the "
            "wall time were CPU)",
        )
    )
    first, s = samples[0], samples[-1]
    rows.append(("gpu 0 PCIe", f"TX {first.pcie_tx_kbps} KB/s, RX {first.pcie_rx_kbps} KB/s"))
    reasons = f" ({'; '.join(s.health_reasons)})" if s.health_reasons else ""
    rows.append(
        (
            "gpu 0 now",
            f"health {s.health.value}{reasons}, util {s.utilization_pct}%, "
            f"{s.power_mw} mW, energy {s.energy_mj} mJ, {s.temperature_c} C",
        )
    )
    procs = (
        "unknown"
        if s.processes is None
        else ", ".join(f"pid {p.pid} {p.used_memory_bytes} B" for p in s.processes) or "none"
    )
    throttle = "unknown" if s.throttle_reasons is None else ", ".join(s.throttle_reasons) or "none"
    rows.append(("gpu 0 clocks", f"throttle reasons: {throttle}"))
    rows.append(("gpu 0 processes", procs))


def check_nvml(simulate: str | None, replay: Path | None, calls: int) -> int:
    nvml: Any = None
    try:
        if replay is not None:
            nvml = RecordedNvml(replay, simulate_latency=True)
            reader: GpuReader = NvmlReader(nvml)
        elif simulate:
            reader = SimulatedReader(simulate, "sim")
        else:
            reader = NvmlReader()
            import pynvml

            nvml = pynvml
    except GpuReaderError as exc:
        rows.append(("nvml", f"FAILED: {exc}"))
        return 0
    count = describe_inventory(reader)
    if count:
        describe_samples(reader, count)
    if nvml is not None and count:
        rows.append(("nvml per call", f"median of {calls} calls on GPU 0:"))
        per_call_costs(nvml, calls)
    reader.close()
    return count


def check_loop(simulate: str | None, data_dir: Path) -> None:
    try:
        from scheduler.cli.jobs import load_spec, ship_code
        from scheduler.cli.localstack import LocalStack
        from scheduler.client import ApiClient
        from scheduler.domain.enums import Role
    except ImportError as exc:
        rows.append(("loop", f"skipped: {exc} (carry the wheels of scripts/gpu_wheels.sh)"))
        return
    stack = LocalStack(data_dir, say=say)
    try:
        stack.start()
        token = stack.add_provider("gpu-lab", "GPU lab", "reserved", site="gpu-lab")
        stack.start_agent("gpu-node-1", token, site="gpu-lab", simulate=simulate, ray_cpus=4)
        node = stack.admin.nodes()[0]  # type: ignore[union-attr]
        rows.append(
            (
                "agent node",
                f"{node.name}: {len(node.gpus)}x {node.gpus[0].model}, "
                f"health {node.gpus[0].health.value}",
            )
        )
        eng = ApiClient(stack.server_url, stack.token(Role.engineer, "gpu-check"))
        spec = load_spec(REPO / "examples/gpu/gpu-smoke.yaml")
        # a job names the model version it trains, which must be registered first
        model, _, version = str(spec["model"]).partition(":")
        stack.admin.request("POST", "/v1/models", json={"name": model})  # type: ignore[union-attr]
        stack.admin.request(  # type: ignore[union-attr]
            "POST", f"/v1/models/{model}/versions", json={"version": version}
        )
        ship_code(eng, spec, say=say)
        job = eng.submit(spec)
        peak = {"util": 0}
        done = threading.Event()

        def watch() -> None:  # what the agent's heartbeats report while the job runs
            while not done.is_set():
                for g in stack.admin.nodes()[0].gpus:  # type: ignore[union-attr]
                    peak["util"] = max(peak["util"], g.utilization_pct or 0)
                time.sleep(1)

        threading.Thread(target=watch, daemon=True).start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:
            detail = eng.job(job.id)
            if detail.status.value in ("completed", "failed", "cancelled"):
                break
            time.sleep(1)
        done.set()
        detail = eng.job(job.id)
        alloc = detail.allocations[-1] if detail.allocations else None
        logs = eng.logs(job.id).logs.get(0, "")
        result = [
            ln for ln in logs.splitlines() if ln.startswith(("RESULT", "MISMATCH", "devices"))
        ]
        rows.append(
            (
                "job",
                f"{detail.status.value} in {time.monotonic() - t0:.0f}s"
                + (f" ({detail.error})" if detail.error else ""),
            )
        )
        if alloc:
            rows.append(("placed on", f"{alloc.workers[0].node} GPU {alloc.workers[0].gpus[0]}"))
            rows.append(("ledger", f"{alloc.gpu_seconds} GPU-seconds ({alloc.end_reason})"))
        rows.extend(("worker", line) for line in result)
        rows.append(("peak util seen by agent", f"{peak['util']}%"))
    finally:
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", help="dry run without GPUs, e.g. 1xH100-80GB")
    parser.add_argument(
        "--replay",
        type=Path,
        help="read the NVML part from a recording, e.g. tests/fixtures/nvml/h200-141gb",
    )
    parser.add_argument("--calls", type=int, default=20, help="calls timed per NVML query")
    parser.add_argument("--data-dir", type=Path, help="scratch folder [default: a new temp dir]")
    args = parser.parse_args()
    args.data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="andromeda-gpu-check-"))
    count = check_nvml(args.simulate, args.replay, args.calls)
    if count and (args.replay is None or args.simulate):
        check_loop(args.simulate, args.data_dir)
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
