"""``andromeda agent``: the node agent for provider GPU hosts."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
from pathlib import Path
from types import FrameType

import click

from scheduler.cli.common import handle_errors
from scheduler.client import ApiClient
from scheduler.domain.jobspec import NAME_RE


def _check_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not re.fullmatch(NAME_RE, value):
        raise click.BadParameter(
            f"{value!r} is not a lower-case DNS label (a-z, 0-9 and '-', at most 63 characters)"
        )
    return value


def _default_name() -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")
    return name[:63] or "node"


@click.command()
@click.option(
    "--server",
    envvar="ANDROMEDA_SERVER",
    required=True,
    show_envvar=True,
    help="Control-plane URL, e.g. http://control-plane:8700.",
)
@click.option(
    "--token",
    envvar="ANDROMEDA_TOKEN",
    required=True,
    show_envvar=True,
    help="A provider token (andromeda token create --role provider --provider NAME).",
)
@click.option(
    "--name",
    "node_name",
    default=_default_name,
    show_default="host name",
    help="Node name: a DNS label, unique in the fleet.",
    callback=_check_name,
)
@click.option(
    "--level",
    type=click.Choice(["reserved", "committed", "spot"]),
    help="Commitment level, if the provider has agreements at several levels.",
)
@click.option(
    "--simulate", metavar="SPEC", help="Simulate GPUs instead of reading NVML, e.g. 4xH100-80GB."
)
@click.option(
    "--replay",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Replay recorded NVML data from a folder (nvml_snapshot.json ...).",
)
@click.option(
    "--ray-address",
    envvar="RAY_ADDRESS",
    show_envvar=True,
    help="Join this Ray cluster with a worker labelled for this node. Without it, "
    "the Ray worker is assumed to be managed elsewhere (KubeRay).",
)
@click.option("--ray-num-cpus", type=click.IntRange(1), help="CPUs this node offers to Ray.")
@click.option(
    "--ray-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the Ray worker's output to this file.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(0.2),
    default=None,
    help="Seconds between heartbeats [default: what the server asks for].",
)
@click.option("--once", is_flag=True, help="Register, send one heartbeat, print the node, exit.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning"]))
@handle_errors
def agent(
    server: str,
    token: str,
    node_name: str,
    level: str | None,
    simulate: str | None,
    replay: Path | None,
    ray_address: str | None,
    ray_num_cpus: int | None,
    ray_log: Path | None,
    heartbeat_interval: float | None,
    once: bool,
    log_level: str,
) -> None:
    """Register this host's GPUs and heartbeat their capacity and health."""
    from agents.agent import Agent, AgentOptions
    from agents.gpu import GpuReaderError, open_reader

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    logging.basicConfig(
        level=log_level.upper(), format=f"%(asctime)s %(levelname)s agent[{node_name}]: %(message)s"
    )
    try:
        reader = open_reader(simulate=simulate, replay=replay, node_name=node_name)
    except (GpuReaderError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--simulate/--replay") from exc
    options = AgentOptions(
        node_name=node_name,
        level=level,
        ray_address=None if once else ray_address,
        ray_num_cpus=ray_num_cpus,
        ray_log=ray_log,
        heartbeat_interval_s=heartbeat_interval,
    )
    with ApiClient(server, token) as client:
        runner = Agent(client, reader, options)
        if once:
            registered = runner.register()
            runner.heartbeat_once()
            node = registered.node
            click.echo(
                f"node {node.name} ({node.provider}, {node.level.value}): "
                f"{len(node.gpus)} GPU(s) {', '.join(g.model for g in node.gpus)}"
            )
            reader.close()
            return

        def _stop(signum: int, _frame: FrameType | None) -> None:
            runner.stop_event.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        with contextlib.suppress(InterruptedError):
            runner.run()
