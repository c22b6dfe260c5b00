"""Why a job waits, in words an engineer can act on.

Every job the policy does not place gets one specific reason, from the most fundamental
obstacle to the transient one: no node of its kind at all; a worker larger than any node;
a gang larger than any one site; where and when it is expected to start (a reservation);
which jobs it is preempting and by when they stop; or how many GPUs it waits for and why
preempting would not help.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from scheduler.policy.capacity import Pool, Prefs
from scheduler.policy.config import PolicyConfig
from scheduler.policy.constraints import describe_constraint, describe_levels
from scheduler.policy.types import JobRequest, Preemption, Reservation


def at(t: int, now_s: int) -> str:
    """``14:20 UTC`` today, ``2026-12-04 14:20 UTC`` on another day (UTC, minute precision)."""
    when = datetime.fromtimestamp(t, UTC)
    today = datetime.fromtimestamp(now_s, UTC).date()
    return when.strftime("%H:%M UTC" if when.date() == today else "%Y-%m-%d %H:%M UTC")


def at_seconds(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S UTC")


def gpu_hours(gpu_s: int) -> str:
    hours = gpu_s / 3600
    return f"{hours:.1f}" if hours >= 10 else f"{hours:.2f}"


def _site(name: str, provider_id: int, site_id: int) -> str:
    return name or f"site {site_id} of provider {provider_id}"


def reservation(res: Reservation, now_s: int, *, waiting_for: str = "") -> str:
    text = f"expected to start by {at(res.start_s, now_s)} on "
    text += _site(res.site_name, res.provider_id, res.site_id)
    text += " (GPUs reserved for it: later jobs may use them only if they end before)"
    return f"{waiting_for}; {text}" if waiting_for else text


def preempting(pre: Preemption, jobs: Sequence[int], site_name: str) -> str:
    names = ", ".join(str(j) for j in jobs)
    return (
        f"preempting job{'s' if len(jobs) > 1 else ''} {names} on "
        f"{_site(site_name, pre.provider_id, pre.site_id)} (they lose "
        f"{gpu_hours(pre.lost_gpu_s)} GPU-h since their last checkpoint); starts when they "
        f"have stopped, by {at_seconds(pre.deadline_s)}"
    )


def stopping_for(jobs: Sequence[int], until_s: int) -> str:
    names = ", ".join(str(j) for j in jobs)
    return (
        f"waiting for preempted job{'s' if len(jobs) > 1 else ''} {names} to checkpoint and "
        f"stop (by {at_seconds(until_s)})"
    )


def not_placeable(
    job: JobRequest,
    classes: frozenset[int],
    prefs: Prefs,
    pools: Sequence[Pool],
    config: PolicyConfig,
) -> str | None:
    """The reason a job can never run on the nodes passed in, or None if it could."""
    n, g = job.num_workers, job.gpus_per_worker
    if not classes:  # classes come from the nodes passed in, so none match
        return f"no ready node has {describe_constraint(job)}"
    if all(p is None for p in prefs):
        return f"its priority class may run on {describe_levels(job, config)} capacity"
    statics = [pool.static_capacity(classes, g, prefs) for pool in pools]
    if not any(s[1] for s in statics):
        return (
            f"no ready node with {describe_constraint(job)} is on capacity its priority class "
            f"may use ({describe_levels(job, config)})"
        )
    largest_node = max(s[2] for s in statics)
    if largest_node < g:
        return (
            f"needs {g} GPUs per worker on one node; the largest ready node with "
            f"{describe_constraint(job)} has {largest_node}"
        )
    if max(s[0] for s in statics) < n:
        biggest = max(s[1] for s in statics)
        total = sum(s[1] for s in statics)
        text = (
            f"needs {n} workers x {g} GPUs in one provider; the largest provider has "
            f"{biggest} matching GPUs"
        )
        if sum(s[0] for s in statics) >= n:
            text += f" ({total} across all providers; a gang never spans providers)"
        return text
    return None


def waiting(
    job: JobRequest,
    classes: frozenset[int],
    prefs: Prefs,
    pools: Sequence[Pool],
    why_not_preempt: str,
    held_for: str = "",
) -> str:
    """A job that could run here, but not now."""
    n, g = job.num_workers, job.gpus_per_worker
    frees = [pool.free_capacity(classes, g, prefs) for pool in pools]
    free_gpus = sum(f[1] for f in frees)
    want = f"{n * g} free GPUs" if n == 1 else f"{n} workers x {g} free GPUs in one provider"
    text = f"waiting for {want} ({free_gpus} free on matching nodes of any provider"
    if free_gpus >= n * g:
        text += f"; fragmented: the best provider fits {max(f[0] for f in frees)} of {n} workers"
    text += ")"
    if held_for:
        text += f"; {held_for}"
    return f"{text}; {why_not_preempt}"
