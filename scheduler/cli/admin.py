"""Control-plane commands: server, db upgrade, tokens, providers, nodes."""

from __future__ import annotations

import logging
import os
import sys
from types import FrameType
from typing import Any

import click

from scheduler import __version__
from scheduler.cli.common import client_from, handle_errors, server_options
from scheduler.cli.output import ago, table
from scheduler.cli.times import parse_when
from scheduler.config import Settings
from scheduler.domain.enums import CommitmentLevel, Role
from scheduler.schemas import NodePublic


@click.command()
@click.option("--host", default=None, help="Bind address [default: 127.0.0.1].")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="[default: 8700]")
@click.option("--no-scheduler", is_flag=True, help="Serve the API only (no scheduling loop).")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning"]),
    help="Requests are logged only at debug.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Server processes on the one port (PostgreSQL only): each serves the API and "
    "takes heartbeats; one at a time runs the scheduling loop (the lease decides).",
)
def server(
    host: str | None, port: int | None, no_scheduler: bool, log_level: str, workers: int
) -> None:
    """Run the control plane: migrations, REST API, scheduler loop.

    The database is DATABASE_URL (default: a SQLite file under ~/.andromeda). The control
    plane needs no Ray: each site's agent (`andromeda agent --head`) runs the work on the
    site's own Ray cluster and pulls its assignments from here.
    """
    import uvicorn

    from scheduler.api.app import create_app
    from scheduler.db.migrate import upgrade

    # The heartbeat writer thread waits on the database a few times per batch; each time
    # it wants the GIL back from a busy event loop it waits up to the switch interval
    # (5 ms by default): 1 ms keeps a batch's round trips from queueing behind requests.
    sys.setswitchinterval(0.001)

    overrides: dict[str, object] = {}
    if host:
        overrides["host"] = host
    if port:
        overrides["port"] = port
    if no_scheduler:
        overrides["scheduler_enabled"] = False
    settings = Settings(**overrides)  # type: ignore[arg-type]
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.policy_config is not None:  # refused before anything starts, in a sentence
        from scheduler.policy import PolicyConfig, PolicyConfigError

        try:
            PolicyConfig.from_file(settings.policy_config)
        except PolicyConfigError as exc:
            raise click.ClickException(f"ANDROMEDA_POLICY_CONFIG: {exc}") from None
    if workers > 1 and not settings.database_url.startswith("postgresql"):
        raise click.ClickException(
            "--workers needs PostgreSQL: SQLite takes one writer, and one server process"
        )
    upgrade(settings.database_url)
    logging.getLogger("scheduler").info(
        "andromeda server %s on http://%s:%s, database %s, scheduler %s%s",
        __version__,
        settings.host,
        settings.port,
        _safe_url(settings.database_url),
        "on" if settings.scheduler_enabled else "off",
        f", {workers} processes" if workers > 1 else "",
    )
    served_as: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": log_level,
        "access_log": log_level == "debug",
        "loop": "uvloop",
        "http": "httptools",
        "timeout_graceful_shutdown": 10,
    }
    if workers > 1:
        # Each process builds its own app from the environment (uvicorn starts them).
        os.environ["ANDROMEDA_LOG_LEVEL"] = log_level
        for key, value in overrides.items():
            os.environ[f"ANDROMEDA_{key.upper()}"] = str(value)
        uvicorn.run(
            "scheduler.api.app:app_from_environment", factory=True, workers=workers, **served_as
        )
        return
    app = create_app(settings)
    config = uvicorn.Config(app, **served_as)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.state.notifier.close()  # long polls answer now, so shutdown need not wait
            super().handle_exit(sig, frame)

    served = _Server(config)
    served.run()
    if not served.started:  # start-up refused (another server holds SQLite, say): logged
        raise SystemExit(1)


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the schema of DATABASE_URL to the latest migration."""
    from scheduler.db.migrate import upgrade

    settings = Settings()
    upgrade(settings.database_url)
    click.echo(f"schema up to date ({_safe_url(settings.database_url)})")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@click.group()
def token() -> None:
    """API tokens."""


@token.command("create")
@click.option("--name", required=True, help="Who or what the token is for.")
@click.option("--role", required=True, type=click.Choice([r.value for r in Role]))
@click.option("--provider", help="The provider a provider token acts for.")
@click.option(
    "--site",
    help="Bind a provider token to one of its sites: a registration token that registers "
    "and reports that site's nodes only (what to give each site's hosts).",
)
@click.option(
    "--local",
    is_flag=True,
    help="Write straight to DATABASE_URL (for the first admin token); otherwise ask "
    "the server with an admin token.",
)
@click.option("--server", envvar="ANDROMEDA_SERVER", default="http://127.0.0.1:8700")
@click.option("--token", "admin_token", envvar="ANDROMEDA_TOKEN", default=None)
@handle_errors
def token_create(
    name: str,
    role: str,
    provider: str | None,
    site: str | None,
    local: bool,
    server: str,
    admin_token: str | None,
) -> None:
    """Create a token and print its secret (shown only this once)."""
    if local:
        from scheduler.db.engine import make_engine, session_scope
        from scheduler.db.migrate import upgrade
        from scheduler.errors import AndromedaError
        from scheduler.services.tokens import create_token

        settings = Settings()
        upgrade(settings.database_url)
        try:
            with session_scope(make_engine(settings.database_url)) as session:
                _, secret = create_token(
                    session, name=name, role=Role(role), provider_name=provider, site_name=site
                )
        except AndromedaError as exc:
            raise click.ClickException(exc.message) from exc
        # The secret goes to stdout (for scripts); where it was written, to stderr.
        click.echo(f"token written to {_safe_url(settings.database_url)}", err=True)
    else:
        if not admin_token:
            raise click.UsageError("pass --token (an admin token) or --local")
        with client_from(server, admin_token) as api:
            body = {"name": name, "role": role, "provider": provider, "site": site}
            secret = api.request("POST", "/v1/tokens", json=body)["token"]
    click.echo(secret)


@click.group()
def provider() -> None:
    """Compute providers and their agreements."""


@provider.command("create")
@click.argument("name")
@click.option("--display-name")
@click.option(
    "--level",
    required=True,
    type=click.Choice([lvl.value for lvl in CommitmentLevel]),
    help="Commitment level of the first agreement.",
)
@click.option("--committed-gpus", type=click.IntRange(0), help="GPUs promised (reserved).")
@click.option("--committed-gpu-hours", type=click.IntRange(0), help="GPU-hours per month.")
@click.option("--notice-days", type=click.IntRange(0), default=0, show_default=True)
@click.option(
    "--site",
    "site_name",
    help="Name of the provider's first site (one Ray cluster). [default: the provider's name]",
)
@click.option("--no-site", is_flag=True, help="Create no site yet (`andromeda site create`).")
@server_options
@handle_errors
def provider_create(
    name: str,
    display_name: str | None,
    level: str,
    committed_gpus: int | None,
    committed_gpu_hours: int | None,
    notice_days: int,
    site_name: str | None,
    no_site: bool,
    server: str,
    token: str,
) -> None:
    """Create a provider with its first agreement and its first site."""
    with client_from(server, token) as api:
        api.request("POST", "/v1/providers", json={"name": name, "display_name": display_name})
        api.request(
            "POST",
            f"/v1/providers/{name}/agreements",
            json={
                "level": level,
                "committed_gpus": committed_gpus,
                "committed_gpu_hours_per_month": committed_gpu_hours,
                "notice_days": notice_days,
            },
        )
        if not no_site:
            site = site_name or name
            api.request("POST", f"/v1/providers/{name}/sites", json={"name": site})
    click.echo(f"provider {name} created ({level})" + ("" if no_site else f", site {site}"))


@click.group()
def site() -> None:
    """Sites: one Ray cluster each, at one provider."""


@site.command("create")
@click.argument("name")
@click.option("--provider", "provider_name", required=True, help="The provider it belongs to.")
@server_options
@handle_errors
def site_create(name: str, provider_name: str, server: str, token: str) -> None:
    """Create a site. Its head host then runs `andromeda agent --head --site NAME`."""
    with client_from(server, token) as api:
        api.request("POST", f"/v1/providers/{provider_name}/sites", json={"name": name})
    click.echo(f"site {name} created for {provider_name}")


@site.command("list")
@server_options
@handle_errors
def site_list(server: str, token: str) -> None:
    """List sites, their nodes and when their agent last reported."""
    with client_from(server, token) as api:
        rows = api.list_all("/v1/sites")
    click.echo(
        table(
            ["site", "provider", "nodes", "agent seen", "version"],
            [
                [
                    r["name"],
                    r["provider"],
                    r["nodes"],
                    (ago(parse_when(r["last_seen_at"])) + " ago") if r["last_seen_at"] else "never",
                    f"{r['applied_version']}/{r['assignments_version']}",
                ]
                for r in rows
            ],
        )
    )


@provider.command("list")
@server_options
@handle_errors
def provider_list(server: str, token: str) -> None:
    """List providers."""
    with client_from(server, token) as api:
        rows = api.list_all("/v1/providers")
    click.echo(
        table(
            ["name", "display name", "created"],
            [[p["name"], p["display_name"], p["created_at"]] for p in rows],
        )
    )


def _health_note(node: NodePublic) -> str:
    notes = []
    if node.gpu_source_error:
        notes.append(f"NVML broken: {node.gpu_source_error}")
    for state in ("failed", "degraded"):
        bad = [g for g in node.gpus if g.health.value == state]
        if bad:
            notes.append(f"{len(bad)} GPU {state}")
    mig = sum(1 for g in node.gpus if g.mig_enabled)
    if mig:
        notes.append(f"{mig} GPU MIG (no gangs)")
    if node.clock_skew_ms is not None and abs(node.clock_skew_ms) > 5000:
        notes.append(f"clock {node.clock_skew_ms / 1000:+.0f}s")
    return "; ".join(notes) or "ok"


@click.command()
@server_options
@handle_errors
def nodes(server: str, token: str) -> None:
    """List nodes with their GPUs, status and last heartbeat; ``health`` says what is
    wrong (failed or degraded GPUs, NVML broken on the node, a clock off the server's)."""
    with client_from(server, token) as api:
        rows = api.nodes()
    click.echo(
        table(
            [
                "node",
                "provider",
                "site",
                "level",
                "status",
                "ray",
                "gpus",
                "busy",
                "heartbeat",
                "health",
            ],
            [
                [
                    n.name,
                    n.provider,
                    n.site,
                    n.level.value,
                    n.status.value,
                    "joined" if n.ray_joined else "no",
                    f"{len(n.gpus)}x{n.gpus[0].model}" if n.gpus else "0",
                    sum(g.busy for g in n.gpus),
                    ago(n.last_heartbeat_at) + " ago",
                    _health_note(n),
                ]
                for n in rows
            ],
        )
    )


@click.command()
@click.argument("action", type=click.Choice(["drain", "cordon", "uncordon", "remove"]))
@click.argument("name")
@click.option("--reason", help="Shown with the node's status.")
@click.option(
    "--notice",
    "notice",
    metavar="DURATION",
    help="drain: how long running work gets to checkpoint before it moves, e.g. 90s, "
    "10m, 1h. [default: the agreement's reclaim notice]",
)
@click.option(
    "--let-finish", is_flag=True, help="drain: let running work finish here instead of moving it."
)
@server_options
@handle_errors
def node(
    action: str,
    name: str,
    reason: str | None,
    notice: str | None,
    let_finish: bool,
    server: str,
    token: str,
) -> None:
    """Drain, cordon, uncordon or remove a node.

    \b
    drain     take the node back: no new work; running work gets the notice to
              checkpoint, then is stopped and moved elsewhere (provider_reclaim)
    cordon    no new work; running work stays
    uncordon  ready for work again (a cordon or drain an admin set is lifted
              only with an admin token)
    remove    retire the node for good (it must hold no work: drain it first);
              its history stays, its agent is refused, its name is not reused
    """
    if action != "drain" and (notice or let_finish):
        raise click.UsageError("--notice and --let-finish apply to drain only")
    if action == "remove":
        if reason:
            raise click.UsageError("--reason does not apply to remove")
        with client_from(server, token) as api:
            result = api.remove_node(name)
        click.echo(f"node {result.name}: {result.status.value}")
        return
    status = {"drain": "draining", "cordon": "cordoned", "uncordon": "ready"}[action]
    notice_s = parse_duration(notice, "--notice") if notice else None
    with client_from(server, token) as api:
        result = api.set_node_status(name, status, reason, notice_s=notice_s, let_finish=let_finish)
    click.echo(f"node {result.name}: {result.status.value}")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> int:
    """``90``, ``90s``, ``10m``, ``1h``, ``2d`` -> seconds; a UsageError that says how."""
    value = text.strip().lower()
    unit = value[-1] if value and value[-1] in _UNITS else "s"
    number = value[:-1] if value and value[-1] in _UNITS else value
    if not number.isdigit():
        raise click.UsageError(f"{option}: {text!r} is not a duration (try 90s, 10m or 1h)")
    return int(number) * _UNITS[unit]


@click.group("gpu-conflicts", invoke_without_command=True)
@click.pass_context
@server_options
@handle_errors
def gpu_conflicts(ctx: click.Context, server: str, token: str) -> None:
    """GPU UUIDs a second node tried to register (admins). Without a subcommand: list the
    open ones."""
    ctx.obj = (server, token)
    if ctx.invoked_subcommand is not None:
        return
    with client_from(server, token) as api:
        rows = api.list_all("/v1/gpu-conflicts")
    click.echo(
        table(
            ["id", "gpu", "registered on", "claimed by", "attempts", "last seen"],
            [
                [
                    r["id"],
                    r["gpu_uuid"],
                    r["registered_on"],
                    f"{r['claimant_node']} ({r['claimant_provider']})",
                    r["attempts"],
                    r["last_seen_at"],
                ]
                for r in rows
            ],
        )
    )


@gpu_conflicts.command("resolve")
@click.argument("conflict_id", type=click.IntRange(min=1))
@click.option(
    "--release",
    "decision",
    flag_value="release",
    help="Take the GPU off the node it is registered on (it must hold no work) so the "
    "claimant's next registration gets it.",
)
@click.option("--dismiss", "decision", flag_value="dismiss", help="Refuse the claim.")
@click.option("--note", help="Why (kept with the conflict).")
@click.pass_obj
@handle_errors
def gpu_conflicts_resolve(
    obj: tuple[str, str], conflict_id: int, decision: str | None, note: str | None
) -> None:
    """Resolve a GPU conflict: --release or --dismiss."""
    if decision is None:
        raise click.UsageError("say --release or --dismiss")
    server, token = obj
    with client_from(server, token) as api:
        row = api.request(
            "POST",
            f"/v1/gpu-conflicts/{conflict_id}/resolve",
            json={"release": decision == "release", "note": note},
        )
    click.echo(f"GPU conflict {row['id']} ({row['gpu_uuid']}): {row['resolution']}")
