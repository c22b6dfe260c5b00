"""preemption with grace, checkpoints, reclaim notice

An allocation asked to stop for another job remembers which (``stop_for_job_id``), so the
policy waits for it instead of preempting again; the latest checkpoint a site reported for
an allocation (``last_checkpoint_at``) decides what a preemption would lose; an agreement
says how much notice a reclaimed node gives its work (``reclaim_notice_s``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 12:55:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import scheduler.db.types

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("allocation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stop_for_job_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "last_checkpoint_at", scheduler.db.types.UTCDateTime(timezone=True), nullable=True
            )
        )
    with op.batch_alter_table("agreement", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("reclaim_notice_s", sa.Integer(), nullable=False, server_default="300")
        )


def downgrade() -> None:
    with op.batch_alter_table("agreement", schema=None) as batch_op:
        batch_op.drop_column("reclaim_notice_s")
    with op.batch_alter_table("allocation", schema=None) as batch_op:
        batch_op.drop_column("last_checkpoint_at")
        batch_op.drop_column("stop_for_job_id")
