"""Everything only a real GPU can show, in one run, ending in a short table:

1. the NVML reader on the real GPUs: inventory, health, one sample, and what each call costs;
2. the whole loop on real hardware: the control plane, an agent reading NVML (no
   --simulate) that starts its site's Ray head with its node's labels, the scheduler placing
   examples/gpu/gpu-smoke.yaml on that node, the site's agent pulling it and running it,
   the job multiplying bf16 matrices on the GPU the scheduler chose, the agent's heartbeats
   seeing the GPU busy, and the GPU-seconds in the ledger.

Run through scripts/gpu_check.sh on the device machine. `--simulate SPEC` runs the same
flow on a machine without GPUs (the job then fails for lack of CUDA, which the table shows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.gpu import GpuReaderError, NvmlReader, SimulatedReader  # noqa: E402
from scheduler.cli.jobs import load_spec, ship_code  # noqa: E402
from scheduler.cli.localstack import LocalStack  # noqa: E402
from scheduler.client import ApiClient  # noqa: E402
from scheduler.domain.enums import Role  # noqa: E402

rows: list[tuple[str, str]] = []


def say(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def check_nvml(simulate: str | None) -> int:
    try:
        reader = SimulatedReader(simulate, "sim") if simulate else NvmlReader()
    except GpuReaderError as exc:
        rows.append(("nvml", f"FAILED: {exc}"))
        return 0
    inventory = reader.inventory()
    for gpu in inventory:
        rows.append((f"gpu {gpu.index}", f"{gpu.name} ({gpu.model}) {gpu.uuid}"))
    timings = []
    for _ in range(10):
        t0 = time.perf_counter()
        samples = reader.sample()
        timings.append((time.perf_counter() - t0) * 1000)
    s = samples[0]
    rows.append(("nvml driver", str(reader.driver_version())))
    rows.append(
        ("sample()", f"{statistics.median(timings):.1f} ms median for {len(inventory)} GPU(s)")
    )
    rows.append(
        (
            "gpu 0 now",
            f"health {s.health.value}, util {s.utilization_pct}%, "
            f"{s.power_mw} mW, energy {s.energy_mj} mJ, {s.temperature_c} C",
        )
    )
    reader.close()
    return len(inventory)


def check_loop(simulate: str | None, data_dir: Path) -> None:
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
    parser.add_argument("--data-dir", type=Path, help="scratch folder [default: a new temp dir]")
    args = parser.parse_args()
    args.data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="andromeda-gpu-check-"))
    count = check_nvml(args.simulate)
    if count:
        check_loop(args.simulate, args.data_dir)
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
