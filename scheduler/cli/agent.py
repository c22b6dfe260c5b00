"""``andromeda agent`` (every GPU host of a site) and ``andromeda site-agent`` (a site whose
Ray cluster is run by something else, such as KubeRay)."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from scheduler.cli.common import handle_errors
from scheduler.client import ApiClient
from scheduler.domain.jobspec import NAME_RE


def _check_name(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not re.fullmatch(NAME_RE, value):
        raise click.BadParameter(
            f"{value!r} is not a lower-case DNS label (a-z, 0-9 and '-', at most 63 characters)"
        )
    return value


def _default_name() -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")
    return name[:63] or "node"


F = TypeVar("F", bound=Callable[..., Any])


_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _insecure_flag(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta["andromeda_insecure"] = value
    return value


def _checked_server(ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """The agents send a provider token with every request: never in clear text over a
    network, unless the operator says so (``--insecure``)."""
    url = urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise click.BadParameter(f"{value!r} is not an http(s) URL", param_hint="--server")
    host = url.hostname
    loopback = host in _LOOPBACK or host.startswith("127.")
    if url.scheme == "http" and not loopback and not ctx.meta.get("andromeda_insecure"):
        raise click.BadParameter(
            f"refusing to send the provider token over plain HTTP to {host}: use https:// "
            "(docs/OPERATIONS.md shows TLS), or pass --insecure on a network you trust",
            param_hint="--server",
        )
    return value


def _server_and_token(func: F) -> F:
    func = click.option(
        "--token",
        envvar="ANDROMEDA_TOKEN",
        required=True,
        show_envvar=True,
        help="A provider token (andromeda token create --role provider --provider NAME).",
    )(func)
    func = click.option(
        "--insecure",
        is_flag=True,
        is_eager=True,
        expose_value=False,
        callback=_insecure_flag,
        help="Allow a plain-HTTP --server that is not on this host (the token travels in "
        "clear text).",
    )(func)
    return click.option(
        "--server",
        envvar="ANDROMEDA_SERVER",
        required=True,
        show_envvar=True,
        callback=_checked_server,
        help="Control-plane URL, e.g. https://andromeda.example:8700 (plain http only to "
        "this host, or with --insecure).",
    )(func)


def _logging(level: str, who: str) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s %(levelname)s {who}: %(message)s")


def _stop_on_signals(stop: object) -> None:
    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def _drain_on_signals(request_stop: Callable[[], None]) -> None:
    """The node agent's handler: the first SIGTERM/SIGINT drains, the second stops now."""

    def _handle(signum: int, _frame: FrameType | None) -> None:
        request_stop()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)


@click.command()
@_server_and_token
@click.option(
    "--name",
    "node_name",
    default=_default_name,
    show_default="host name",
    help="Node name: a DNS label, unique in the fleet.",
    callback=_check_name,
)
@click.option(
    "--site",
    callback=_check_name,
    help="The site (Ray cluster) this node belongs to; may be omitted if the provider has one.",
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
    "--head",
    is_flag=True,
    help="This is the site's head host: start the site's Ray head here (token auth on) "
    "and run the site's agent, which pulls the site's work and runs it.",
)
@click.option(
    "--ray-address",
    metavar="HOST:PORT",
    help="Join the site's Ray head at this address as a worker node.",
)
@click.option(
    "--ray-port",
    type=click.IntRange(1, 65535),
    default=6380,
    show_default=True,
    help="With --head: the port of the head's GCS (6379 is often Redis's).",
)
@click.option(
    "--ray-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The site's Ray token. A head creates it (mode 0600); copy it to the site's other "
    "hosts. [default: DATA_DIR/ray-token]",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the agent keeps its state. [default: ~/.andromeda/agent/NAME]",
)
@click.option("--ray-num-cpus", type=click.IntRange(1), help="CPUs this node offers to Ray.")
@click.option(
    "--ray-temp-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Ray's temporary folder on this host [default: Ray's].",
)
@click.option(
    "--checkpoint-root",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --head: the folder (shared by the site's hosts) under which a job without a "
    "checkpoint URI gets one (ANDROMEDA_CHECKPOINT). [default: DATA_DIR/checkpoints]",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(0.2),
    default=None,
    help="Seconds between heartbeats [default: what the server asks for].",
)
@click.option(
    "--spool-path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The SQLite file that keeps evidence while the server is unreachable. "
    "[default: DATA_DIR/spool.db]",
)
@click.option(
    "--spool-max-mb",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Bound of the evidence spool (about 45 days for 8 GPUs at the default); near it "
    "the node is cordoned, when full new evidence is refused.",
)
@click.option(
    "--drain-timeout",
    type=click.IntRange(0),
    default=900,
    show_default=True,
    help="On SIGTERM: seconds to wait for the node's work to move before stopping "
    "(match systemd's TimeoutStopSec). A second SIGTERM stops at once.",
)
@click.option("--once", is_flag=True, help="Register, send one heartbeat, print the node, exit.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning"]))
@handle_errors
def agent(
    server: str,
    token: str,
    node_name: str,
    site: str | None,
    level: str | None,
    simulate: str | None,
    replay: Path | None,
    head: bool,
    ray_address: str | None,
    ray_port: int,
    ray_token_file: Path | None,
    data_dir: Path | None,
    ray_num_cpus: int | None,
    ray_temp_dir: Path | None,
    checkpoint_root: Path | None,
    heartbeat_interval: float | None,
    spool_path: Path | None,
    spool_max_mb: int,
    drain_timeout: int,
    once: bool,
    log_level: str,
) -> None:
    """Register this host's GPUs and heartbeat their capacity and health.

    \b
    On the site's head host:   andromeda agent --head --site SITE ...
    On its other hosts:        andromeda agent --site SITE --ray-address HEAD:6380 \\
                                   --ray-token-file /etc/andromeda/ray-token ...
    Without --head or --ray-address the host's Ray node is managed elsewhere (KubeRay).
    SIGTERM drains the node (its work is moved) before the agent stops; docs/AGENT.md.
    """
    from agents.agent import Agent, AgentOptions, StopNow
    from agents.gpu import GpuReaderError, open_reader

    if head and ray_address:
        raise click.UsageError("--head starts the site's Ray head; --ray-address joins one")
    _logging(log_level, f"agent[{node_name}]")
    try:
        reader = open_reader(simulate=simulate, replay=replay, node_name=node_name)
    except (GpuReaderError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--simulate/--replay") from exc
    options = AgentOptions(
        node_name=node_name,
        data_dir=(data_dir or Path.home() / ".andromeda" / "agent" / node_name).resolve(),
        site=site,
        level=level,
        ray=None if once else ("head" if head else "worker" if ray_address else None),
        ray_address=ray_address,
        ray_port=ray_port,
        ray_token_file=ray_token_file.resolve() if ray_token_file else None,
        ray_num_cpus=ray_num_cpus,
        ray_temp_dir=ray_temp_dir,
        heartbeat_interval_s=heartbeat_interval,
        checkpoint_root=checkpoint_root.resolve() if checkpoint_root else None,
        spool_path=spool_path.resolve() if spool_path else None,
        spool_max_bytes=spool_max_mb * 1024 * 1024,
        drain_timeout_s=drain_timeout,
    )
    with ApiClient(server, token) as client:
        runner = Agent(
            client,
            reader,
            options,
            site_client=lambda: ApiClient(server, token),
            restore_signals=lambda: _drain_on_signals(runner.request_stop),
        )
        if once:
            registered = runner.register()
            runner.heartbeat_once()
            node = registered.node
            click.echo(
                f"node {node.name} ({node.provider}, site {node.site}, {node.level.value}): "
                f"{len(node.gpus)} GPU(s) {', '.join(g.model for g in node.gpus)}"
            )
            reader.close()
            return
        _drain_on_signals(runner.request_stop)
        with contextlib.suppress(InterruptedError, StopNow):
            runner.run()


@click.command("site-agent")
@_server_and_token
@click.option("--site", required=True, callback=_check_name, help="The site to serve.")
@click.option(
    "--ray-address", required=True, metavar="HOST:PORT", help="The site's Ray head (GCS)."
)
@click.option(
    "--ray-token-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The site's Ray token.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the agent keeps packages and scratch. [default: ~/.andromeda/site/SITE]",
)
@click.option(
    "--checkpoint-root",
    type=click.Path(file_okay=False, path_type=Path),
    help="Shared folder for default checkpoints. [default: DATA_DIR/checkpoints]",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning"]))
@handle_errors
def site_agent(
    server: str,
    token: str,
    site: str,
    ray_address: str,
    ray_token_file: Path,
    data_dir: Path | None,
    checkpoint_root: Path | None,
    log_level: str,
) -> None:
    """Pull a site's work and run it on a Ray cluster managed elsewhere (e.g. a KubeRay
    RayCluster whose nodes carry the andromeda.io/* labels)."""
    import os

    from agents.raynode import token_env
    from agents.site.agent import SiteAgent
    from agents.site.launcher import SiteLauncher

    _logging(log_level, f"site-agent[{site}]")
    os.environ.update(token_env(ray_token_file.resolve()))
    data = (data_dir or Path.home() / ".andromeda" / "site" / site).resolve()
    launcher = SiteLauncher(
        ray_address,
        site,
        scratch_root=data / "scratch",
        checkpoint_root=checkpoint_root.resolve() if checkpoint_root else data / "checkpoints",
    )
    with ApiClient(server, token) as client:
        runner = SiteAgent(client, site, launcher, package_dir=data / "packages")
        _stop_on_signals(runner.stop_event)
        runner.run()
