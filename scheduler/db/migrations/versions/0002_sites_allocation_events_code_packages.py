"""sites, allocation events, code packages

One Ray cluster per provider site: nodes, allocations and usage rows name their site; an
allocation records when its gang really ran (``running_at``) and when the site confirmed its
workers gone (``released_at``). Existing data gets one site per provider, named after it,
and allocations that already ran are taken to have run from their start.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 09:01:22.859116
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

import scheduler.db.types

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_END_REASON = sa.Enum(
    "completed",
    "failed",
    "cancelled",
    "preempted",
    "node_lost",
    "provider_reclaim",
    "timeout",
    name="endreason",
    native_enum=False,
    length=32,
)


def upgrade() -> None:
    op.create_table(
        "code_package",
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("uploaded_by", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("created_at", scheduler.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )
    op.create_table(
        "site",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("created_at", scheduler.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("assignments_version", sa.BigInteger(), nullable=False),
        sa.Column("applied_version", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at", scheduler.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("agent_info", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["provider_id"], ["provider.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("site") as batch_op:
        batch_op.create_index(batch_op.f("ix_site_name"), ["name"], unique=True)
        batch_op.create_index(batch_op.f("ix_site_provider_id"), ["provider_id"], unique=False)

    op.create_table(
        "allocation_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("allocation_id", sa.Integer(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("at", scheduler.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("received_at", scheduler.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["allocation_id"], ["allocation.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("allocation_event") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_allocation_event_allocation_id"), ["allocation_id"], unique=False
        )

    # New columns start nullable, are filled from the existing rows, then tightened.
    with op.batch_alter_table("allocation") as batch_op:
        batch_op.add_column(sa.Column("site_id", sa.Integer(), nullable=True))
        utc = scheduler.db.types.UTCDateTime(timezone=True)
        batch_op.add_column(sa.Column("running_at", utc, nullable=True))
        batch_op.add_column(sa.Column("released_at", utc, nullable=True))
        batch_op.add_column(sa.Column("failed_rank", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("stop_requested_at", utc, nullable=True))
        batch_op.add_column(sa.Column("stop_deadline_at", utc, nullable=True))
        batch_op.add_column(sa.Column("stop_reason", _END_REASON, nullable=True))
        batch_op.add_column(
            sa.Column("site_version", sa.BigInteger(), nullable=False, server_default="0")
        )
    for table in ("node", "usage_interval"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("site_id", sa.Integer(), nullable=True))

    _one_site_per_provider()

    with op.batch_alter_table("allocation") as batch_op:
        batch_op.alter_column("site_id", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("site_version", server_default=None)
        batch_op.create_index(batch_op.f("ix_allocation_released_at"), ["released_at"])
        batch_op.create_index(batch_op.f("ix_allocation_site_id"), ["site_id"])
        batch_op.create_foreign_key("fk_allocation_site_id", "site", ["site_id"], ["id"])
    with op.batch_alter_table("node") as batch_op:
        batch_op.alter_column("site_id", existing_type=sa.Integer(), nullable=False)
        batch_op.create_index(batch_op.f("ix_node_site_id"), ["site_id"])
        batch_op.create_foreign_key("fk_node_site_id", "site", ["site_id"], ["id"])
    with op.batch_alter_table("usage_interval") as batch_op:
        batch_op.alter_column("site_id", existing_type=sa.Integer(), nullable=False)
        batch_op.create_foreign_key("fk_usage_interval_site_id", "site", ["site_id"], ["id"])


def _one_site_per_provider() -> None:
    conn = op.get_bind()
    site = sa.table(
        "site",
        sa.column("name", sa.String),
        sa.column("provider_id", sa.Integer),
        sa.column("created_at", scheduler.db.types.UTCDateTime(timezone=True)),
        sa.column("assignments_version", sa.BigInteger),
        sa.column("applied_version", sa.BigInteger),
        sa.column("agent_info", sa.JSON),
    )
    now = datetime.now(UTC)
    for provider_id, name in conn.execute(sa.text("SELECT id, name FROM provider")).all():
        conn.execute(
            site.insert().values(
                name=name,
                provider_id=provider_id,
                created_at=now,
                assignments_version=0,
                applied_version=0,
                agent_info={},
            )
        )
    by_provider = "(SELECT s.id FROM site s WHERE s.provider_id = {t}.provider_id)"
    for table in ("node", "allocation", "usage_interval"):
        conn.execute(sa.text(f"UPDATE {table} SET site_id = {by_provider.format(t=table)}"))
    conn.execute(sa.text("UPDATE allocation SET running_at = started_at, released_at = ended_at"))


def downgrade() -> None:
    with op.batch_alter_table("usage_interval") as batch_op:
        batch_op.drop_constraint("fk_usage_interval_site_id", type_="foreignkey")
        batch_op.drop_column("site_id")
    with op.batch_alter_table("node") as batch_op:
        batch_op.drop_constraint("fk_node_site_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_node_site_id"))
        batch_op.drop_column("site_id")
    with op.batch_alter_table("allocation") as batch_op:
        batch_op.drop_constraint("fk_allocation_site_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_allocation_site_id"))
        batch_op.drop_index(batch_op.f("ix_allocation_released_at"))
        for column in (
            "site_version",
            "stop_reason",
            "stop_deadline_at",
            "stop_requested_at",
            "failed_rank",
            "released_at",
            "running_at",
            "site_id",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("allocation_event") as batch_op:
        batch_op.drop_index(batch_op.f("ix_allocation_event_allocation_id"))
    op.drop_table("allocation_event")
    with op.batch_alter_table("site") as batch_op:
        batch_op.drop_index(batch_op.f("ix_site_provider_id"))
        batch_op.drop_index(batch_op.f("ix_site_name"))
    op.drop_table("site")
    op.drop_table("code_package")
