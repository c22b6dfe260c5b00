"""scheduler leader lease

One row per scheduler loop: which server process holds the lease, its epoch (the fencing
token every loop write checks) and, by the database's clock, when it was acquired, last
renewed and when it expires (``scheduler/loop/leader.py``). No row is seeded: the first
server to try creates it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 15:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import scheduler.db.types

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    utc = scheduler.db.types.UTCDateTime(timezone=True)
    op.create_table(
        "scheduler_lease",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
        sa.Column("holder", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("acquired_at", utc, nullable=False),
        sa.Column("renewed_at", utc, nullable=False),
        sa.Column("expires_at", utc, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("scheduler_lease")
