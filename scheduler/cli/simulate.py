"""``andromeda simulate``: replay a trace through a placement policy on a simulated fleet."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from scheduler.cli.admin import parse_duration
from scheduler.policy import POLICIES, PolicyConfig, PolicyConfigError, schedule
from scheduler.policy.types import PolicyFn
from scheduler.sim.fleet import DEFAULT_FLEET, FleetError, load_fleet
from scheduler.sim.generic import TraceError, is_generic, load_generic
from scheduler.sim.philly import PACKAGED_TRACE, PRIORITY_SEED, load_philly
from scheduler.sim.replay import InvalidDecision, replay
from scheduler.sim.summary import render, summarize


@click.command()
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A trace: Philly's CSV or the generic CSV (docs/SIMULATE.md), plain or .gz. "
    "[default: the Philly trace shipped with the package]",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "philly", "generic"]),
    default="auto",
    show_default=True,
    help="auto: generic when the header has submit_s, duration_s and gpus.",
)
@click.option(
    "--fleet",
    "fleet_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Fleet YAML: providers, levels, commitments, node groups. [default: 64 nodes x 8 "
    "H100 over five providers]",
)
@click.option(
    "--policy",
    type=click.Choice(sorted(POLICIES)),
    default="andromeda",
    show_default=True,
    help="andromeda (ours), fifo (strict), first-fit (plain Ray placement groups), kueue-like.",
)
@click.option(
    "--policy-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML/JSON policy settings for --policy andromeda (docs/POLICY.md).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Replay only the first N jobs.")
@click.option(
    "--seed",
    type=int,
    default=PRIORITY_SEED,
    show_default=True,
    help="Philly: the seed that gives each team its priority class.",
)
@click.option(
    "--checkpoint-every",
    metavar="DURATION",
    help="Assume jobs that state no checkpoint interval checkpoint this often (e.g. 30m).",
)
@click.option(
    "--cycle",
    "cycle_s",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Seconds between scheduling cycles.",
)
@click.option(
    "--grace",
    "grace_s",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="Seconds a preempted job keeps its GPUs to checkpoint.",
)
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def simulate(
    trace_path: Path | None,
    fmt: str,
    fleet_path: Path | None,
    policy: str,
    policy_config: Path | None,
    limit: int | None,
    seed: int,
    checkpoint_every: str | None,
    cycle_s: int,
    grace_s: int,
    output: str,
    quiet: bool,
) -> None:
    """Replay a job trace through a placement policy on a simulated fleet.

    The same policy code as the live scheduler decides every cycle; each decision is
    validated. Reports queueing delay and JCT per priority class (mean, p50, p99), GPU
    utilisation (total and useful), preemptions and GPU-hours lost, GPU-hours per provider
    and level, and each committed provider's fulfilment.

    \b
    andromeda simulate --limit 3000
    andromeda simulate --trace my.csv --fleet fleet.yaml --policy first-fit --output json
    """
    path = trace_path or PACKAGED_TRACE
    try:
        generic = fmt == "generic" or (fmt == "auto" and is_generic(path))
        jobs = (
            load_generic(path, limit=limit)
            if generic
            else load_philly(path, limit=limit, seed=seed)
        )
        fleet = load_fleet(fleet_path or DEFAULT_FLEET)
        fn: PolicyFn = POLICIES[policy]
        if policy_config is not None:
            if policy != "andromeda":
                raise click.UsageError("--policy-config applies to --policy andromeda only")
            fn = functools.partial(schedule, config=PolicyConfig.from_file(policy_config))
    except (TraceError, FleetError, PolicyConfigError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    except (KeyError, ValueError) as exc:
        raise click.ClickException(
            f"{path}: not a Philly trace ({exc}); try --format generic"
        ) from None
    if checkpoint_every:
        every = parse_duration(checkpoint_every, "--checkpoint-every")
        jobs = [j if j.checkpoint_s is not None else replace(j, checkpoint_s=every) for j in jobs]
    if not quiet:
        click.echo(
            f"replaying {len(jobs):,} jobs on {len(fleet.nodes)} nodes ({fleet.total_gpus:,} "
            f"GPUs) under {policy}",
            err=True,
        )
    try:
        if quiet:
            result = replay(
                jobs,
                fleet.nodes,
                fn,
                cycle_s=cycle_s,
                grace_s=grace_s,
                commitments=fleet.commitments,
            )
        else:
            with click.progressbar(length=len(jobs), label="jobs finished", file=sys.stderr) as bar:
                seen = [0]

                def progress(done: int) -> None:
                    bar.update(done - seen[0])
                    seen[0] = done

                result = replay(
                    jobs,
                    fleet.nodes,
                    fn,
                    cycle_s=cycle_s,
                    grace_s=grace_s,
                    commitments=fleet.commitments,
                    progress=progress,
                )
    except InvalidDecision as exc:
        raise click.ClickException(f"the {policy} policy made an invalid decision: {exc}") from None
    summary = summarize(result, fleet, policy=policy)
    if output == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(render(summary))
