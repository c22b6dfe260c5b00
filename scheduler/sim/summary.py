"""Every figure of a replay, as one JSON-ready mapping (``andromeda simulate --output json``)
and as readable tables."""

from __future__ import annotations

import statistics
from typing import Any

from scheduler.domain.enums import PriorityClass
from scheduler.sim.fleet import Fleet
from scheduler.sim.replay import ReplayResult, percentile


def summarize(result: ReplayResult, fleet: Fleet, *, policy: str) -> dict[str, Any]:
    classes: dict[str, Any] = {}
    for cls in [c.value for c in PriorityClass]:
        done = result.finished(cls)
        if not done and not [o for o in result.outcomes if o.job.label == cls]:
            continue
        waits = [o.wait_s for o in done]
        jcts = [o.jct_s or 0 for o in done]
        classes[cls] = {
            "jobs": len(done),
            "wait_s": _stats(waits),
            "jct_s": _stats(jcts),
        }
    delivered = result.provider_gpu_s
    fulfilment = result.fulfilment()
    values = list(fulfilment.values())
    return {
        "policy": policy,
        "jobs": len(result.outcomes),
        "unfinished": len(result.unfinished),
        "gpus": result.total_gpus,
        "makespan_s": result.makespan_s,
        "classes": classes,
        "utilisation": round(result.utilisation, 4),
        "useful_utilisation": round(result.useful_utilisation, 4),
        "utilisation_while_waiting": round(result.utilisation_while_waiting, 4),
        "preemptions": result.preemptions,
        "gpu_hours_delivered": round(result.busy_gpu_s / 3600, 1),
        "gpu_hours_useful": round(result.useful_gpu_s / 3600, 1),
        "gpu_hours_lost": round(result.lost_gpu_s / 3600, 1),
        "lost_fraction": round(result.lost_gpu_s / result.busy_gpu_s, 5)
        if result.busy_gpu_s
        else 0,
        "window_s": result.window_s,
        "providers": {
            fleet.provider_names[pid]: {
                "level": fleet.levels[pid].value,
                "gpu_hours": round(delivered.get(pid, 0) / 3600, 1),
                "committed_gpu_hours": (
                    round(result.committed_gpu_s[pid] / 3600, 1)
                    if pid in result.committed_gpu_s
                    else None
                ),
                "fulfilment": round(fulfilment[pid], 4) if pid in fulfilment else None,
            }
            for pid in sorted(fleet.provider_names)
        },
        "levels_gpu_hours": {k: round(v / 3600, 1) for k, v in sorted(result.level_gpu_s.items())},
        "fulfilment_gap": round(max(values) - min(values), 4) if len(values) > 1 else 0.0,
        "policy_calls": len(result.policy_s),
        "policy_seconds": round(sum(result.policy_s), 3),
    }


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    return {
        "mean": round(statistics.fmean(values), 1),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
    }


def render(summary: dict[str, Any]) -> str:
    """The summary as plain tables, minutes for waits and hours for JCTs."""
    lines = [
        f"policy {summary['policy']}: {summary['jobs']} jobs on {summary['gpus']} GPUs, "
        f"makespan {summary['makespan_s'] / 3600:.1f} h, {summary['unfinished']} unfinished",
        "",
        f"{'class':<9} {'jobs':>7} {'wait mean':>10} {'p50':>8} {'p99':>8} "
        f"{'JCT mean':>9} {'p50':>7} {'p99':>7}",
        f"{'':<9} {'':>7} {'(min)':>10} {'':>8} {'':>8} {'(h)':>9} {'':>7} {'':>7}",
    ]
    for cls, c in summary["classes"].items():
        w, j = c["wait_s"], c["jct_s"]
        lines.append(
            f"{cls:<9} {c['jobs']:>7} {w['mean'] / 60:>10.1f} {w['p50'] / 60:>8.1f} "
            f"{w['p99'] / 60:>8.1f} {j['mean'] / 3600:>9.2f} {j['p50'] / 3600:>7.2f} "
            f"{j['p99'] / 3600:>7.2f}"
        )
    lines += [
        "",
        f"GPU utilisation {100 * summary['utilisation']:.1f}% "
        f"(useful {100 * summary['useful_utilisation']:.1f}%, while jobs waited "
        f"{100 * summary['utilisation_while_waiting']:.1f}%)",
        f"preemptions {summary['preemptions']}, GPU-hours lost {summary['gpu_hours_lost']:,} "
        f"({100 * summary['lost_fraction']:.2f}% of {summary['gpu_hours_delivered']:,} delivered)",
        "",
        f"{'provider':<12} {'level':<10} {'GPU-h':>10} {'committed':>10} {'fulfilment':>10}",
    ]
    for name, p in summary["providers"].items():
        committed = f"{p['committed_gpu_hours']:,.0f}" if p["committed_gpu_hours"] else "-"
        ful = f"{100 * p['fulfilment']:.1f}%" if p["fulfilment"] is not None else "-"
        lines.append(
            f"{name:<12} {p['level']:<10} {p['gpu_hours']:>10,.0f} {committed:>10} {ful:>10}"
        )
    lines.append(
        "fulfilment gap (best - worst committed provider): "
        f"{100 * summary['fulfilment_gap']:.1f} pts"
    )
    return "\n".join(lines)
