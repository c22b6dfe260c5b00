"""Entry point of the ``andromeda`` command."""

from __future__ import annotations

import click

from scheduler import __version__
from scheduler.cli import admin, attribution, jobs
from scheduler.cli.agent import agent, site_agent
from scheduler.cli.demo import demo, down, up
from scheduler.cli.simulate import simulate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="andromeda")
def cli() -> None:
    """Andromeda: place GPU training jobs on provider capacity and account every GPU-hour.

    \b
    Engineers:         model, submit, jobs, job, logs, cancel
    Providers:         agent, site-agent, nodes, node, site, statement
    Partner managers:  usage, revenue, statements, statement, adjust
    Control plane:     server, db, token, provider
    Try it locally:    demo, up, down
    Policy research:   simulate

    Commands that talk to a server read ANDROMEDA_SERVER and ANDROMEDA_TOKEN.
    """


for command in (
    jobs.submit,
    jobs.jobs,
    jobs.job,
    jobs.logs,
    jobs.cancel,
    jobs.usage,
    agent,
    site_agent,
    admin.nodes,
    admin.node,
    admin.gpu_conflicts,
    admin.server,
    admin.db,
    admin.token,
    admin.provider,
    admin.site,
    demo,
    up,
    down,
    attribution.model,
    attribution.revenue,
    attribution.statement,
    attribution.statements,
    attribution.adjust,
    simulate,
):
    cli.add_command(command)


def main() -> None:
    cli()
