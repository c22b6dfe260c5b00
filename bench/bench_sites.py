"""Benchmark the pull protocol: what a site's agent costs, and what a control-plane restart
costs the work that runs.

Usage (from the repository root)::

    .venv/bin/python bench/bench_sites.py [--rounds 20] [--workers 2] [--jobs 20]

Table 1, submit -> every worker running, alternating in the same run on the same site:
- andromeda: ``POST /v1/jobs``; the scheduler places the gang; the site's agent, long-polling
  its assignments, creates the placement group and the worker actors and starts the
  entrypoints; measured to the moment the last worker started (the allocation's
  ``running_at``, written from the site's report);
- raw Ray: a driver connected to the same site creates the same placement group (same
  bundles, pinned by the same node labels, detached) and the same worker actors (detached,
  named), and starts the same entrypoints; measured to the moment the last one started.

Table 2, a control-plane restart with ``--jobs`` jobs running: the same jobs once without a
restart (the baseline) and once with ``kill -9`` of the server while they run, and a
restart: how long until the server was back and every site had reported its work again
(re-adopted), how many jobs needed a second attempt, and the GPU-seconds lost (billed
minus what the workers really ran; the goal is 0).

The stack is the demo's (``scheduler/cli/localstack.py``: SQLite, one site, simulated GPUs)
unless ``--database-url`` names another database. Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.raynode import token_env  # noqa: E402
from agents.site.worker import Worker  # noqa: E402
from common import logger, table  # noqa: E402
from scheduler.cli.localstack import LocalStack  # noqa: E402
from scheduler.client import ApiClient  # noqa: E402
from scheduler.domain.enums import Role  # noqa: E402
from scheduler.domain.labels import NODE_LABEL  # noqa: E402

SITE = "bench-site"
ENTRYPOINT = "sleep 1"
MODEL = "bench:v1"  # jobs name a registered model version


log = logger("bench_sites")


def start_stack(stack: LocalStack, nodes: dict[str, str], database_url: str | None) -> None:
    admin = stack.start(heartbeat_interval_s=2, node_lost_after_s=30, database_url=database_url)
    name, _, version = MODEL.partition(":")
    admin.request("POST", "/v1/models", json={"name": name})
    admin.request("POST", f"/v1/models/{name}/versions", json={"version": version})
    token = stack.add_provider("bench", "Bench", "reserved", site=SITE)
    for node, gpus in nodes.items():
        stack.start_agent(node, token, site=SITE, simulate=gpus, ray_cpus=4)


# --- table 1 ------------------------------------------------------------------------------
def api_round(eng: ApiClient, workers: int, n: int) -> float:
    body = {
        "name": f"bench-{n}",
        "model": MODEL,
        "entrypoint": ENTRYPOINT,
        "workers": workers,
        "gpus_per_worker": 1,
        "priority": "high",
    }
    t0 = datetime.now(UTC)
    job = eng.submit(body)
    running = None
    while True:
        detail = eng.job(job.id)
        alloc = detail.allocations[-1] if detail.allocations else None
        if alloc and alloc.running_at and running is None:
            running = (alloc.running_at - t0).total_seconds()
        if detail.status.value in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    # the GPUs are free again once the site confirmed the workers gone
    while any(a.phase != "ended" for a in eng.job(job.id).allocations):
        time.sleep(0.05)
    assert detail.status.value == "completed" and running is not None, detail
    return running


def raw_round(ray: object, worker_cls: object, nodes: list[str], scratch: str, n: int) -> float:
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    r = ray  # type: ignore[assignment]
    t0 = time.time()
    pg = placement_group(
        [{"CPU": 1.0, "GPU": 1.0} for _ in nodes],
        strategy="PACK",
        name=f"raw{n}",
        lifetime="detached",
        bundle_label_selector=[{NODE_LABEL: node} for node in nodes],
    )
    r.get(pg.ready())  # type: ignore[attr-defined]
    actors = [
        worker_cls.options(  # type: ignore[attr-defined]
            name=f"raw{n}-r{i}",
            lifetime="detached",
            max_restarts=0,
            num_gpus=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=i
            ),
        ).remote(900_000 + n, i, scratch)
        for i in range(len(nodes))
    ]
    master, port = r.get(actors[0].address.remote())  # type: ignore[attr-defined]
    env = {"MASTER_ADDR": str(master), "MASTER_PORT": str(port)}
    starts = r.get([a.launch.remote(ENTRYPOINT, env, None, None) for a in actors])  # type: ignore[attr-defined]
    took = max(starts) - t0
    r.get([a.wait.remote() for a in actors])  # type: ignore[attr-defined]
    for actor in actors:
        r.kill(actor)  # type: ignore[attr-defined]
    remove_placement_group(pg)
    return took


def bench_latency(stack: LocalStack, rounds: int, workers: int) -> list[list[object]]:
    os.environ.update(token_env(stack.sites[SITE].token_file))  # before Ray reads its config
    import ray

    ray.init(address=stack.sites[SITE].head_address, log_to_driver=False, namespace="bench")
    worker_cls = ray.remote(num_cpus=1, max_concurrency=8)(Worker)
    eng = ApiClient(stack.server_url, stack.token(Role.engineer, "bench"))
    nodes = [f"n{i}" for i in range(workers)]
    scratch = str(stack.data_dir / "raw-scratch")
    api: list[float] = []
    raw: list[float] = []
    try:
        api_round(eng, workers, -1)  # warm-up: the first actor start on a node is slower
        raw_round(ray, worker_cls, nodes, scratch, -1)
        for n in range(rounds):
            raw.append(raw_round(ray, worker_cls, nodes, scratch, n))
            api.append(api_round(eng, workers, n))
            log(
                f"round {n + 1}/{rounds}: raw {raw[-1] * 1000:.0f} ms, "
                f"andromeda {api[-1] * 1000:.0f} ms"
            )
    finally:
        ray.shutdown()  # before the stack stops the cluster, which would end this process

    def p90(xs: list[float]) -> float:
        return sorted(xs)[max(0, int(len(xs) * 0.9) - 1)]

    rows = []
    for label, fn in (("median", statistics.median), ("p90", p90)):
        a, b = fn(raw) * 1000, fn(api) * 1000
        rows.append(
            [f"submit -> all workers running, {label}", f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}"]
        )
    return rows


# --- table 2 ------------------------------------------------------------------------------
def run_jobs(stack: LocalStack, jobs: int, seconds: int, *, restart: bool) -> dict[str, float]:
    eng = ApiClient(stack.server_url, stack.token(Role.engineer, f"bench-{restart}"))
    ids = []
    for n in range(jobs):
        body = {
            "name": f"steady-{n}",
            "model": MODEL,
            "entrypoint": f"sleep {seconds}",
            "gpus_per_worker": 1,
            "preemptible": False,
        }
        ids.append(eng.submit(body).id)
    t0 = time.monotonic()
    while not all((d := eng.job(i)).allocations and d.allocations[-1].running_at for i in ids):
        time.sleep(0.2)
    out: dict[str, float] = {"all running after (s)": time.monotonic() - t0}
    if restart:
        stack.kill("server", signal.SIGKILL)
        killed = datetime.now(UTC)
        t_kill = time.monotonic()
        time.sleep(1)
        stack.respawn("server")
        admin = ApiClient(stack.server_url, stack.record.admin_token)
        while True:
            try:
                admin.request("GET", "/healthz")
                break
            except (ConnectionError, OSError):
                time.sleep(0.05)
        out["server back after kill (s)"] = time.monotonic() - t_kill
        while True:  # re-adopted: the site has reported its work to the new server
            sites = admin.request("GET", "/v1/sites")
            seen = [s["last_seen_at"] for s in sites if s["name"] == SITE]
            if seen and seen[0] and datetime.fromisoformat(seen[0]) > killed:
                break
            time.sleep(0.05)
        out["all re-adopted after kill (s)"] = time.monotonic() - t_kill
    details = []
    for i in ids:
        while (d := eng.job(i)).status.value not in ("completed", "failed", "cancelled"):
            time.sleep(0.2)
        details.append(d)
    allocs = [a for d in details for a in d.allocations]
    done = [a for a in allocs if a.end_reason is not None and a.end_reason.value == "completed"]
    out["jobs completed"] = sum(d.status.value == "completed" for d in details)
    out["extra attempts"] = sum(d.attempts - 1 for d in details)
    out["GPU-seconds billed"] = sum(a.gpu_seconds or 0 for a in done)
    # Work the restart threw away: GPU-seconds of allocations that did not complete.
    out["GPU-seconds lost"] = sum(a.gpu_seconds or 0 for a in allocs if a not in done)
    # The ledger against what the entrypoints did (`sleep N` each): whole seconds apart at most.
    out["billed - slept (GPU-s)"] = out["GPU-seconds billed"] - jobs * seconds
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--job-seconds", type=int, default=20)
    parser.add_argument("--database-url", help="default: SQLite in a temp dir")
    parser.add_argument("--skip-latency", action="store_true", help="table 2 only")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="andromeda-bench-sites-"))
    nodes = {f"n{i}": "1xH100-80GB" for i in range(args.workers)}
    for i in range(-(-args.jobs // 10)):  # room for every job at once, 10 GPUs a node
        nodes[f"big{i}"] = f"{min(10, args.jobs - 10 * i)}xH100-80GB"
    log(f"starting the stack in {data}")
    stack = LocalStack(data, say=log)
    ok = False
    try:
        start_stack(stack, nodes, args.database_url)
        if not args.skip_latency:
            latency = bench_latency(stack, args.rounds, args.workers)
            print(
                f"\nTable 1: {args.workers} workers x 1 GPU, entrypoint `{ENTRYPOINT}`, "
                f"{args.rounds} rounds (ms)\n"
            )
            print(table(["metric", "raw Ray", "andromeda", "ratio"], latency), flush=True)
        jobs = args.jobs
        log(f"{jobs} jobs of {args.job_seconds}s without a restart (baseline)")
        base = run_jobs(stack, jobs, args.job_seconds, restart=False)
        log(f"{jobs} jobs of {args.job_seconds}s with kill -9 of the server while they run")
        hit = run_jobs(stack, jobs, args.job_seconds, restart=True)
        ok = True
    except Exception:
        # Printed now: once the stack is closed, a process still connected to its Ray
        # cluster may be ended by Ray before the error would reach the terminal.
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    finally:
        stack.close()
        if ok:
            shutil.rmtree(data, ignore_errors=True)
        else:
            log(f"kept {data} for its logs")
    print(
        f"\nTable 2: {jobs} one-GPU jobs of {args.job_seconds}s, kill -9 of the control "
        "plane while all run\n"
    )
    rows = []
    for key in hit:
        b = base.get(key)
        ratio = f"{hit[key] / b:.2f}" if b else "-"
        rows.append(
            [key, "-" if b is None else f"{b:g}", f"{hit[key]:.2f}".rstrip("0").rstrip("."), ratio]
        )
    print(table(["metric", "no restart", "restart", "ratio"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
